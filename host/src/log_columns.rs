//! Which of a training log's series (TensorBoard tags, CSV columns) hold the training loss,
//! its terms, the LR, the gradient norm, the epoch and the validation loss, by the words of
//! their names (`train/loss`, `train_loss_step`, `Step_Losses/Losses/train_all_loss`,
//! `lr-AdamW`, `Optim/lr`, `train/learning_rate`, `grad_2.0_norm_total`, `eval/loss`, ...),
//! for the readers of [`crate::metrics::Trace`] that have no fixed schema.

/// Lower-case words of a tag (split at anything not a letter or digit).
pub(crate) fn words(tag: &str) -> Vec<String> {
    tag.split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_ascii_lowercase)
        .collect()
}

/// Whether a name is a validation series' (a word `val`, `valid`, `validation`, `eval`,
/// `evaluation`, `test` or `dev`).
pub(crate) fn is_validation(tag: &str) -> bool {
    words(tag).iter().any(|w| {
        matches!(w.as_str(), "val" | "valid" | "validation" | "eval" | "evaluation" | "test" | "dev")
    })
}

/// Whether a name is a loss (a word `loss`, `losses` or one ending in `loss`).
pub(crate) fn is_loss(tag: &str) -> bool {
    words(tag).iter().any(|w| w == "loss" || w == "losses" || w.ends_with("loss"))
}

/// A total loss rather than a component: the last part of the tag has no word but the usual
/// decorations (`train/loss`, `train_all_loss`, `loss_step`; not `loss_mask`).
pub(crate) fn is_total(tag: &str) -> bool {
    let leaf = tag.rsplit('/').next().unwrap_or(tag);
    words(leaf).iter().all(|w| {
        matches!(
            w.as_str(),
            "train"
                | "training"
                | "step"
                | "steps"
                | "loss"
                | "losses"
                | "all"
                | "total"
                | "core"
                | "objective"
                | "batch"
        )
    })
}

/// Among `tags` with their point counts, the one with the most points (counts within 10% of
/// the most count as equal), then `prefer`red, then the shortest name.
pub(crate) fn pick<'a>(tags: &[(&'a str, usize)], prefer: impl Fn(&str) -> bool) -> Option<&'a str> {
    let most = tags.iter().map(|t| t.1).max()?;
    tags.iter().filter(|t| t.1 * 10 >= most * 9).min_by_key(|(t, _)| (!prefer(t), t.len(), *t)).map(|t| t.0)
}

/// Whether a name is an LR's (a word `lr` or `learningrate`, or `learning` `rate`).
pub(crate) fn is_lr(tag: &str) -> bool {
    let w = words(tag);
    w.iter().any(|w| w == "lr" || w == "learningrate")
        || w.windows(2).any(|p| p[0] == "learning" && p[1] == "rate")
}

/// Whether a name is a gradient norm's before clipping (a word `grad...` and one `...norm`,
/// none `clip...`).
pub(crate) fn is_grad_norm(tag: &str) -> bool {
    let w = words(tag);
    w.iter().any(|w| w.starts_with("grad"))
        && w.iter().any(|w| w.ends_with("norm"))
        && !w.iter().any(|w| w.starts_with("clip"))
}

/// Among gradient norms: the total or global one before per-layer ones (a word `total` or
/// `global`, or no word but the norm's own: `train/grad_norm` before `grad_norm/vision`).
pub(crate) fn prefers_total_norm(tag: &str) -> bool {
    let w = words(tag);
    w.iter().any(|w| w == "total" || w == "global")
        || w.iter().all(|w| {
            matches!(
                w.as_str(),
                "train"
                    | "training"
                    | "step"
                    | "grad"
                    | "grads"
                    | "gradient"
                    | "gradients"
                    | "norm"
                    | "gradnorm"
                    | "l2"
                    | "2"
                    | "0"
            )
        })
}

/// Whether a name is the epoch's (its last part is `epoch`).
pub(crate) fn is_epoch(tag: &str) -> bool {
    tag.rsplit('/').next().is_some_and(|l| l.eq_ignore_ascii_case("epoch"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tag choices: the total training loss over a component, an epoch summary or a
    /// validation loss; LR, gradient norm and validation tags by their words.
    #[test]
    fn tags_are_matched_by_their_words() {
        let losses = [("train/loss", 40), ("train/loss_mask", 40), ("train/train_loss", 1), ("eval/loss", 4)];
        let train: Vec<_> = losses.iter().copied().filter(|(t, _)| is_loss(t) && !is_validation(t)).collect();
        assert_eq!(pick(&train, is_total), Some("train/loss"));
        let lightning = [("train_loss_step", 300), ("train_loss_epoch", 10), ("val_loss", 10)];
        let train: Vec<_> =
            lightning.iter().copied().filter(|(t, _)| is_loss(t) && !is_validation(t)).collect();
        assert_eq!(pick(&train, is_total), Some("train_loss_step"));
        let sam = [
            ("Step_Losses/Losses/train_all_loss_mask", 90),
            ("Step_Losses/Losses/train_all_loss", 90),
            ("Losses/train_all_loss", 3),
        ];
        assert_eq!(pick(&sam, is_total), Some("Step_Losses/Losses/train_all_loss"));
        assert!(
            is_validation("eval/loss")
                && is_validation("Losses/val_all_loss")
                && !is_validation("train/evaluated")
        );
        assert!(!is_total("train/loss_dice") && is_total("loss") && is_total("train_loss_step"));
        let norms = [("grad_norm/vision_encoder", 50), ("train/grad_norm", 50), ("grad_norm/text", 50)];
        assert_eq!(pick(&norms, prefers_total_norm), Some("train/grad_norm"));
        assert!(prefers_total_norm("grad_2.0_norm_total") && !prefers_total_norm("grad_norm/fc1"));
    }
}
