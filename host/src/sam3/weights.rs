//! Loading SAM3 checkpoints strictly.
//!
//! Supported layouts, all mapped onto transformers' `Sam3Model` key names (the one vocabulary
//! used by the model code, LoRA target patterns and PEFT adapters):
//! - a transformers directory: `config.json` + `model.safetensors`, or sharded with
//!   `model.safetensors.index.json`; `model_type: sam3` (keys as module paths) or the hub's
//!   `sam3_video` (detector keys under `detector_model.`, tracker keys ignored);
//! - Meta's original `sam3.pt` (keys `detector.*`), through the documented rename rules: fused
//!   qkv / `in_proj` split into q/k/v, the cls row of the position embedding dropped, the CLIP
//!   projection transposed, complex `freqs_cis` buffers and point-prompt weights skipped.
//!
//! Every tensor request goes through [`StrictBackend`], which records missing and mis-shaped
//! tensors instead of failing at the first one; [`Audit::finish`] then also lists checkpoint
//! tensors the model never asked for, so nothing ever loads silently partial.

use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::config::{Layout, Sam3Config};

/// Why a checkpoint could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    /// A file is missing or unreadable.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The checkpoint does not match the model.
    #[error("checkpoint {path} does not match the model config:\n{report}")]
    Mismatch {
        /// The checkpoint.
        path: PathBuf,
        /// Missing / mis-shaped / unexpected tensors, one per line.
        report: String,
    },
}

/// Where each tensor comes from.
enum Store {
    /// Memory-mapped safetensors; `keys` maps the transformers name to the file's key.
    Mmap { st: candle_core::safetensors::MmapedSafetensors, keys: HashMap<String, String> },
    /// Tensors already in memory (from `sam3.pt`, or tests).
    Owned(HashMap<String, Tensor>),
}

impl Store {
    fn names(&self) -> BTreeSet<String> {
        match self {
            Store::Mmap { keys, .. } => keys.keys().cloned().collect(),
            Store::Owned(m) => m.keys().cloned().collect(),
        }
    }

    fn load(&self, name: &str) -> Result<Option<Tensor>> {
        match self {
            Store::Mmap { st, keys } => match keys.get(name) {
                Some(k) => st.load(k, &Device::Cpu).map(Some),
                None => Ok(None),
            },
            Store::Owned(m) => Ok(m.get(name).cloned()),
        }
    }
}

/// What the model asked for and what went wrong, shared with the backend.
#[derive(Default)]
struct AuditState {
    used: BTreeSet<String>,
    missing: BTreeMap<String, Vec<usize>>,
    misshaped: BTreeMap<String, (Vec<usize>, Vec<usize>)>,
}

/// A checkpoint opened for loading, and the audit of what the model took from it.
pub struct Checkpoint {
    store: Arc<Store>,
    audit: Arc<Mutex<AuditState>>,
    origin: PathBuf,
    /// Tensors deliberately not used (tracker weights, point-prompt weights, rope buffers).
    pub ignored: usize,
    /// File keys that map to no model name (e.g. unprefixed keys beside `detector_model.` ones).
    extra: Vec<String>,
    /// Config keys that took transformers' defaults and decide shapes (named on a mismatch).
    defaulted: Vec<String>,
}

/// The VarBuilder backend over a [`Checkpoint`].
pub struct StrictBackend {
    store: Arc<Store>,
    audit: Arc<Mutex<AuditState>>,
}

impl SimpleBackend for StrictBackend {
    fn get(&self, s: Shape, name: &str, _h: candle_nn::Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let mut audit =
            self.audit.lock().map_err(|_| candle_core::Error::Msg("audit lock poisoned".into()))?;
        audit.used.insert(name.to_string());
        match self.store.load(name)? {
            Some(t) if t.dims() == s.dims() => t.to_dtype(dtype)?.to_device(dev),
            Some(t) => {
                audit.misshaped.insert(name.to_string(), (s.dims().to_vec(), t.dims().to_vec()));
                Tensor::zeros(s, dtype, dev)
            }
            None => {
                audit.missing.insert(name.to_string(), s.dims().to_vec());
                Tensor::zeros(s, dtype, dev)
            }
        }
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        let mut audit =
            self.audit.lock().map_err(|_| candle_core::Error::Msg("audit lock poisoned".into()))?;
        audit.used.insert(name.to_string());
        match self.store.load(name)? {
            Some(t) => t.to_dtype(dtype)?.to_device(dev),
            None => candle_core::bail!("tensor {name} not found in the checkpoint"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.store.names().contains(name)
    }
}

impl Checkpoint {
    /// A VarBuilder reading from this checkpoint (paths = transformers' names).
    pub fn var_builder(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        let backend = StrictBackend { store: self.store.clone(), audit: self.audit.clone() };
        VarBuilder::from_backend(Box::new(backend), dtype, device.clone())
    }

    /// In-memory checkpoint (tests, conversions).
    pub fn from_tensors(tensors: HashMap<String, Tensor>, origin: &Path) -> Self {
        Checkpoint {
            store: Arc::new(Store::Owned(tensors)),
            audit: Arc::new(Mutex::new(AuditState::default())),
            origin: origin.into(),
            ignored: 0,
            extra: Vec::new(),
            defaulted: Vec::new(),
        }
    }

    /// Number of tensors available to the model.
    pub fn len(&self) -> usize {
        self.store.names().len()
    }

    /// True when the checkpoint holds no tensor.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// After building the model: an error listing every missing or mis-shaped tensor, and the
    /// unused ones that mean the config describes fewer layers than the checkpoint holds. Other
    /// unused tensors (heads the model does not have) are ignored with one warning, as
    /// transformers does.
    pub fn finish(&self) -> std::result::Result<Coverage, WeightsError> {
        let audit = self.audit.lock().map_err(|_| WeightsError::File {
            path: self.origin.clone(),
            reason: "audit lock poisoned".into(),
        })?;
        let names = self.store.names();
        let unexpected: Vec<&String> =
            names.iter().filter(|n| !audit.used.contains(*n)).chain(self.extra.iter()).collect();
        let mut beyond: BTreeMap<String, BTreeSet<usize>> = BTreeMap::new();
        let mut ignorable = Vec::new();
        for n in &unexpected {
            match beyond_config(n, &audit.used) {
                Some((list, i)) => {
                    beyond.entry(list).or_default().insert(i);
                }
                None => ignorable.push(n.as_str()),
            }
        }
        let mut lines = Vec::new();
        for (n, shape) in &audit.missing {
            lines.push(format!("  missing     {n} (expected shape {shape:?})"));
        }
        for (n, (want, got)) in &audit.misshaped {
            lines.push(format!("  mis-shaped  {n}: model expects {want:?}, checkpoint has {got:?}"));
        }
        if !lines.is_empty() || !beyond.is_empty() {
            for n in &unexpected {
                lines.push(format!("  unexpected  {n}"));
            }
            let total = lines.len();
            if total > 40 {
                lines.truncate(40);
                lines.push(format!("  ... and {} more", total - 40));
            }
            for (list, idx) in &beyond {
                let have =
                    audit.used.iter().filter_map(|u| list_index(u, list)).collect::<BTreeSet<_>>().len();
                let key = LISTS.iter().find(|(l, _)| l == list).map(|(_, k)| *k);
                lines.push(format!(
                    "the checkpoint has more layers than config.json says: {list} has entries {:?}, the config makes {have}{}; \
                     use the config.json that came with these weights",
                    idx.iter().collect::<Vec<_>>(),
                    key.map(|k| format!(" (set by {k})")).unwrap_or_default()
                ));
            }
            if !self.defaulted.is_empty() {
                lines.push(format!(
                    "config.json does not set {}: transformers' defaults were used for them; \
                     set them to this checkpoint's values",
                    self.defaulted.join(", ")
                ));
            }
            return Err(WeightsError::Mismatch { path: self.origin.clone(), report: lines.join("\n") });
        }
        if !ignorable.is_empty() {
            let shown: Vec<&str> = ignorable.iter().take(10).copied().collect();
            tracing::warn!(
                "{}: {} checkpoint tensor(s) belong to no module of the model and were ignored, as transformers does: {}{}",
                self.origin.display(),
                ignorable.len(),
                shown.join(", "),
                if ignorable.len() > 10 { ", ..." } else { "" }
            );
        }
        let in_store = ignorable.iter().filter(|n| names.contains(**n)).count();
        Ok(Coverage {
            used: audit.used.len(),
            available: names.len() - in_store,
            ignored: self.ignored + ignorable.len(),
        })
    }
}

/// The numbered module lists of the model and the config key that sets their length.
const LISTS: [(&str, &str); 8] = [
    ("vision_encoder.backbone.layers", "vision_config.backbone_config.num_hidden_layers"),
    ("vision_encoder.neck.fpn_layers", "vision_config.scale_factors"),
    ("text_encoder.text_model.encoder.layers", "text_config.num_hidden_layers"),
    ("geometry_encoder.layers", "geometry_encoder_config.num_layers"),
    ("detr_encoder.layers", "detr_encoder_config.num_layers"),
    ("detr_decoder.layers", "detr_decoder_config.num_layers"),
    ("mask_decoder.pixel_decoder.conv_layers", "mask_decoder_config.num_upsampling_stages"),
    ("mask_decoder.pixel_decoder.norms", "mask_decoder_config.num_upsampling_stages"),
];

/// The index of `name` in the numbered list `list` (`{list}.{i}.…`).
fn list_index(name: &str, list: &str) -> Option<usize> {
    name.strip_prefix(list)?.strip_prefix('.')?.split('.').next()?.parse().ok()
}

/// For an unused checkpoint key: the numbered module list it extends past the model's length
/// (a list the model has, or one of [`LISTS`]) and its index there; `None` for a key that
/// belongs to no such list (an unrelated head).
fn beyond_config(key: &str, used: &BTreeSet<String>) -> Option<(String, usize)> {
    let parts: Vec<&str> = key.split('.').collect();
    for (i, p) in parts.iter().enumerate().skip(1) {
        let Ok(idx) = p.parse::<usize>() else { continue };
        let list = parts[..i].join(".");
        let have: BTreeSet<usize> = used.iter().filter_map(|u| list_index(u, &list)).collect();
        if have.is_empty() && !LISTS.iter().any(|(l, _)| *l == list) {
            return None;
        }
        if !have.contains(&idx) {
            return Some((list, idx));
        }
    }
    None
}

/// Key coverage of a successful load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Coverage {
    /// Tensors the model took.
    pub used: usize,
    /// Tensors the checkpoint offered (after ignoring tracker/point/buffer tensors).
    pub available: usize,
    /// Tensors deliberately ignored.
    pub ignored: usize,
}

/// The prefix of the detector's keys in a `Sam3VideoModel` checkpoint.
const DETECTOR_PREFIX: &str = "detector_model.";

/// True for checkpoint keys of the video tracker, which the image model ignores.
fn is_tracker_key(k: &str) -> bool {
    k.starts_with("tracker_model.") || k.starts_with("tracker_neck.")
}

/// The weight files of a transformers model directory, as transformers picks them:
/// `model.safetensors` (an index beside it is ignored, with a warning), else the shards named in
/// `model.safetensors.index.json`. Every file must exist.
pub fn weight_files(dir: &Path) -> std::result::Result<Vec<PathBuf>, WeightsError> {
    let file_err = |path: &Path, reason: String| WeightsError::File { path: path.to_path_buf(), reason };
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    let files: Vec<PathBuf> = if single.is_file() {
        if index.is_file() {
            tracing::warn!(
                "{}: holds both model.safetensors and model.safetensors.index.json; loading model.safetensors, \
                 as transformers does (the index and its shards are ignored)",
                dir.display()
            );
        }
        vec![single]
    } else if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(|e| file_err(&index, e.to_string()))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| file_err(&index, format!("not valid JSON: {e}")))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| file_err(&index, "no `weight_map` object".into()))?;
        let mut files: Vec<PathBuf> = map
            .values()
            .filter_map(|f| f.as_str())
            .map(|f| dir.join(f))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        files.dedup();
        files
    } else {
        return Err(file_err(dir, "no model.safetensors or model.safetensors.index.json".into()));
    };
    for f in &files {
        if !f.is_file() {
            return Err(file_err(f, "listed in the index but missing".into()));
        }
    }
    Ok(files)
}

/// Open a transformers-style model directory: returns its config and the checkpoint.
pub fn open_dir(dir: &Path) -> std::result::Result<(Sam3Config, Checkpoint), WeightsError> {
    let file_err = |path: &Path, reason: String| WeightsError::File { path: path.to_path_buf(), reason };
    if !dir.is_dir() {
        return Err(file_err(
            dir,
            "model directory not found (expected config.json + model.safetensors)".into(),
        ));
    }
    let config_path = dir.join("config.json");
    if !config_path.is_file() {
        return Err(file_err(&config_path, "missing: a model directory needs config.json".into()));
    }
    // The config error already names its file.
    let parsed = Sam3Config::parse_file(&config_path).map_err(|e| match e {
        super::config::ConfigError::Invalid { path, reason } => WeightsError::File { path, reason },
        super::config::ConfigError::Read { path, source } => {
            WeightsError::File { path, reason: format!("cannot read: {source}") }
        }
    })?;
    let defaulted: Vec<String> = parsed.defaulted_shapes().into_iter().map(String::from).collect();
    let (config, layout) = (parsed.config, parsed.layout);
    let files = weight_files(dir)?;
    // SAFETY: the files are memory-mapped read-only; lorahost never writes them while loaded.
    let st = unsafe { candle_core::safetensors::MmapedSafetensors::multi(&files) }
        .map_err(|e| file_err(&files[0], format!("not a readable safetensors file: {e}")))?;
    // The detector's keys are under `detector_model.` in a Sam3VideoModel checkpoint and bare in
    // a Sam3Model one; transformers loads either into either model, so go by the file.
    let file_keys: Vec<String> = st.tensors().into_iter().map(|(k, _)| k).collect();
    let prefixed = file_keys.iter().any(|k| k.starts_with(DETECTOR_PREFIX));
    let expected = layout == Layout::Sam3Video;
    if prefixed != expected {
        tracing::info!(
            "{}: config.json is model_type {} but the weights' detector keys are {}; loading them as they are",
            dir.display(),
            if expected { "sam3_video" } else { "sam3" },
            if prefixed { "under `detector_model.` (a Sam3VideoModel checkpoint)" } else { "unprefixed (a Sam3Model checkpoint)" }
        );
    } else {
        tracing::debug!(
            "{}: detector keys {}",
            dir.display(),
            if prefixed { "under `detector_model.`" } else { "unprefixed" }
        );
    }
    let mut keys = HashMap::new();
    let mut extra = Vec::new();
    let mut ignored = 0;
    for k in file_keys {
        if is_tracker_key(&k) {
            ignored += 1;
            continue;
        }
        if !prefixed {
            keys.insert(k.clone(), k);
        } else if let Some(n) = k.strip_prefix(DETECTOR_PREFIX) {
            keys.insert(n.to_string(), k.clone());
        } else {
            extra.push(k);
        }
    }
    let origin = files.first().cloned().unwrap_or_else(|| dir.to_path_buf());
    Ok((
        config,
        Checkpoint {
            store: Arc::new(Store::Mmap { st, keys }),
            audit: Arc::new(Mutex::new(AuditState::default())),
            origin,
            ignored,
            extra,
            defaulted,
        },
    ))
}

/// Rename one key of Meta's original checkpoint (after stripping `detector.`) to the
/// transformers name; `None` for tensors the image model does not use. Fused q/k/v tensors are
/// handled by the caller (they map to three names).
pub fn rename_original(key: &str) -> Option<String> {
    let rules: &[(&str, &str)] = &[
        ("backbone.vision_backbone.trunk.", "vision_encoder.backbone."),
        ("backbone.vision_backbone.convs.", "vision_encoder.neck.fpn_layers."),
        ("backbone.language_backbone.resizer.", "text_projection."),
        ("backbone.language_backbone.encoder.", "text_encoder."),
        ("geometry_encoder.", "geometry_encoder."),
        ("transformer.encoder.", "detr_encoder."),
        ("transformer.decoder.", "detr_decoder."),
        ("dot_prod_scoring.", "dot_product_scoring."),
        ("segmentation_head.", "mask_decoder."),
    ];
    if key.contains("freqs_cis") || key.contains("sam2_convs") || key.contains("points_") {
        return None;
    }
    let (from, to) = rules.iter().find(|(f, _)| key.starts_with(f))?;
    let rest = &key[from.len()..];
    let mut k = format!("{to}{rest}");
    let subs: &[(&str, &str)] = match *to {
        "vision_encoder.backbone." => &[
            ("pos_embed", "embeddings.position_embeddings"),
            ("patch_embed.proj.", "embeddings.patch_embeddings.projection."),
            ("ln_pre.", "layer_norm."),
            ("blocks.", "layers."),
            (".norm1.", ".layer_norm1."),
            (".norm2.", ".layer_norm2."),
            (".attn.proj.", ".attention.o_proj."),
            (".attn.qkv.", ".attention.qkv."),
        ],
        "vision_encoder.neck.fpn_layers." => &[
            (".dconv_2x2_0.", ".scale_layers.0."),
            (".dconv_2x2_1.", ".scale_layers.2."),
            (".dconv_2x2.", ".scale_layers.0."),
            (".conv_1x1.", ".proj1."),
            (".conv_3x3.", ".proj2."),
        ],
        "text_encoder." => &[
            ("token_embedding.", "text_model.embeddings.token_embedding."),
            ("positional_embedding", "text_model.embeddings.position_embedding.weight"),
            ("ln_final.", "text_model.final_layer_norm."),
            ("transformer.resblocks.", "text_model.encoder.layers."),
            (".ln_1.", ".layer_norm1."),
            (".ln_2.", ".layer_norm2."),
            (".mlp.c_fc.", ".mlp.fc1."),
            (".mlp.c_proj.", ".mlp.fc2."),
            (".attn.out_proj.", ".self_attn.out_proj."),
            (".attn.in_proj_", ".self_attn.in_proj_"),
            ("text_projection", "text_projection.weight"),
        ],
        "geometry_encoder." => &[
            ("encode.", "layers."),
            (".cross_attn_image.", ".cross_attn."),
            (".out_proj.", ".o_proj."),
            (".linear1.", ".mlp.fc1."),
            (".linear2.", ".mlp.fc2."),
            (".norm1.", ".layer_norm1."),
            (".norm2.", ".layer_norm2."),
            (".norm3.", ".layer_norm3."),
            ("img_pre_norm.", "vision_layer_norm."),
            ("encode_norm.", "output_layer_norm."),
            ("geometry_encoder.norm.", "geometry_encoder.prompt_layer_norm."),
        ],
        "detr_encoder." => &[
            (".cross_attn_image.", ".cross_attn."),
            (".out_proj.", ".o_proj."),
            (".linear1.", ".mlp.fc1."),
            (".linear2.", ".mlp.fc2."),
            (".norm1.", ".layer_norm1."),
            (".norm2.", ".layer_norm2."),
            (".norm3.", ".layer_norm3."),
        ],
        "detr_decoder." => &[
            (".ca_text.", ".text_cross_attn."),
            (".cross_attn.", ".vision_cross_attn."),
            (".out_proj.", ".o_proj."),
            (".norm1.", ".vision_cross_attn_layer_norm."),
            (".catext_norm.", ".text_cross_attn_layer_norm."),
            (".norm2.", ".self_attn_layer_norm."),
            (".norm3.", ".mlp_layer_norm."),
            (".linear1.", ".mlp.fc1."),
            (".linear2.", ".mlp.fc2."),
            ("detr_decoder.norm.", "detr_decoder.output_layer_norm."),
            ("bbox_embed.layers.0.", "box_head.layer1."),
            ("bbox_embed.layers.1.", "box_head.layer2."),
            ("bbox_embed.layers.2.", "box_head.layer3."),
            ("presence_token_head.layers.0.", "presence_head.layer1."),
            ("presence_token_head.layers.1.", "presence_head.layer2."),
            ("presence_token_head.layers.2.", "presence_head.layer3."),
            ("presence_token_out_norm.", "presence_layer_norm."),
            ("ref_point_head.layers.0.", "ref_point_head.layer1."),
            ("ref_point_head.layers.1.", "ref_point_head.layer2."),
            ("boxRPB_embed_x.layers.0.", "box_rpb_embed_x.layer1."),
            ("boxRPB_embed_x.layers.1.", "box_rpb_embed_x.layer2."),
            ("boxRPB_embed_y.layers.0.", "box_rpb_embed_y.layer1."),
            ("boxRPB_embed_y.layers.1.", "box_rpb_embed_y.layer2."),
        ],
        "dot_product_scoring." => &[
            ("prompt_mlp.layers.0.", "text_mlp.layer1."),
            ("prompt_mlp.layers.1.", "text_mlp.layer2."),
            ("prompt_mlp.out_norm.", "text_mlp_out_norm."),
            ("prompt_proj.", "text_proj."),
            ("hs_proj.", "query_proj."),
        ],
        "mask_decoder." => &[
            ("mask_predictor.mask_embed.layers.", "mask_embedder.layers."),
            ("instance_seg_head.", "instance_projection."),
            ("semantic_seg_head.", "semantic_projection."),
            ("cross_attend_prompt.", "prompt_cross_attn."),
            (".out_proj.", ".o_proj."),
            ("cross_attn_norm.", "prompt_cross_attn_norm."),
        ],
        _ => &[],
    };
    for (a, b) in subs {
        if k.contains(a) {
            k = k.replacen(a, b, 1);
        }
    }
    Some(k)
}

/// Load Meta's original `sam3.pt` (a PyTorch zip checkpoint) into transformers names.
/// The `config` must describe the same model (the original file carries no config).
pub fn open_original(path: &Path) -> std::result::Result<Checkpoint, WeightsError> {
    let file_err = |reason: String| WeightsError::File { path: path.to_path_buf(), reason };
    let pth = candle_core::pickle::PthTensors::new(path, Some("model"))
        .or_else(|_| candle_core::pickle::PthTensors::new(path, None))
        .map_err(|e| file_err(format!("not a readable PyTorch checkpoint: {e}")))?;
    let mut out = HashMap::new();
    let mut ignored = 0;
    let names: Vec<String> = pth.tensor_infos().keys().cloned().collect();
    for full in names {
        let Some(key) = full.strip_prefix("detector.") else {
            ignored += 1;
            continue;
        };
        let Some(name) = rename_original(key) else {
            ignored += 1;
            continue;
        };
        let t = pth
            .get(&full)
            .map_err(|e| file_err(format!("tensor {full}: {e}")))?
            .ok_or_else(|| file_err(format!("tensor {full} listed but not readable")))?;
        insert_converted(&mut out, &name, t).map_err(|e| file_err(format!("tensor {full}: {e}")))?;
    }
    let mut ck = Checkpoint::from_tensors(out, path);
    ck.ignored = ignored;
    Ok(ck)
}

/// Split fused tensors and apply the layout changes of the original → transformers conversion.
fn insert_converted(out: &mut HashMap<String, Tensor>, name: &str, t: Tensor) -> Result<()> {
    let split3 = |out: &mut HashMap<String, Tensor>, prefix: &str, suffix: &str, t: &Tensor| -> Result<()> {
        let n = t.dim(0)? / 3;
        for (i, p) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
            out.insert(format!("{prefix}{p}.{suffix}"), t.narrow(0, i * n, n)?.contiguous()?);
        }
        Ok(())
    };
    if let Some(prefix) = name.strip_suffix("attention.qkv.weight") {
        return split3(out, &format!("{prefix}attention."), "weight", &t);
    }
    if let Some(prefix) = name.strip_suffix("attention.qkv.bias") {
        return split3(out, &format!("{prefix}attention."), "bias", &t);
    }
    if let Some(prefix) = name.strip_suffix("in_proj_weight") {
        return split3(out, prefix, "weight", &t);
    }
    if let Some(prefix) = name.strip_suffix("in_proj_bias") {
        return split3(out, prefix, "bias", &t);
    }
    if name == "vision_encoder.backbone.embeddings.position_embeddings" {
        // Drop the cls slot: (1, 1+N, C) -> (1, N, C).
        let n = t.dim(1)?;
        out.insert(name.to_string(), t.narrow(1, 1, n - 1)?.contiguous()?);
        return Ok(());
    }
    if name == "text_encoder.text_projection.weight" {
        out.insert(name.to_string(), t.t()?.contiguous()?);
        return Ok(());
    }
    out.insert(name.to_string(), t);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn original_names_map_to_transformers_names() {
        let cases = [
            (
                "backbone.vision_backbone.trunk.blocks.3.attn.proj.weight",
                "vision_encoder.backbone.layers.3.attention.o_proj.weight",
            ),
            (
                "backbone.vision_backbone.trunk.blocks.0.norm1.bias",
                "vision_encoder.backbone.layers.0.layer_norm1.bias",
            ),
            (
                "backbone.vision_backbone.trunk.pos_embed",
                "vision_encoder.backbone.embeddings.position_embeddings",
            ),
            (
                "backbone.vision_backbone.convs.0.dconv_2x2_1.weight",
                "vision_encoder.neck.fpn_layers.0.scale_layers.2.weight",
            ),
            (
                "backbone.vision_backbone.convs.1.dconv_2x2.bias",
                "vision_encoder.neck.fpn_layers.1.scale_layers.0.bias",
            ),
            (
                "backbone.language_backbone.encoder.transformer.resblocks.2.mlp.c_fc.weight",
                "text_encoder.text_model.encoder.layers.2.mlp.fc1.weight",
            ),
            (
                "backbone.language_backbone.encoder.positional_embedding",
                "text_encoder.text_model.embeddings.position_embedding.weight",
            ),
            ("backbone.language_backbone.resizer.weight", "text_projection.weight"),
            (
                "geometry_encoder.encode.1.cross_attn_image.out_proj.weight",
                "geometry_encoder.layers.1.cross_attn.o_proj.weight",
            ),
            ("geometry_encoder.img_pre_norm.weight", "geometry_encoder.vision_layer_norm.weight"),
            ("geometry_encoder.norm.weight", "geometry_encoder.prompt_layer_norm.weight"),
            (
                "transformer.decoder.layers.0.ca_text.out_proj.bias",
                "detr_decoder.layers.0.text_cross_attn.o_proj.bias",
            ),
            (
                "transformer.decoder.layers.4.norm2.weight",
                "detr_decoder.layers.4.self_attn_layer_norm.weight",
            ),
            ("transformer.decoder.norm.weight", "detr_decoder.output_layer_norm.weight"),
            (
                "transformer.decoder.boxRPB_embed_y.layers.1.weight",
                "detr_decoder.box_rpb_embed_y.layer2.weight",
            ),
            ("dot_prod_scoring.hs_proj.weight", "dot_product_scoring.query_proj.weight"),
            (
                "segmentation_head.cross_attend_prompt.out_proj.weight",
                "mask_decoder.prompt_cross_attn.o_proj.weight",
            ),
            (
                "segmentation_head.mask_predictor.mask_embed.layers.1.bias",
                "mask_decoder.mask_embedder.layers.1.bias",
            ),
        ];
        for (orig, hf) in cases {
            assert_eq!(rename_original(orig).as_deref(), Some(hf), "{orig}");
        }
        assert_eq!(rename_original("backbone.vision_backbone.trunk.blocks.0.attn.freqs_cis"), None);
        assert_eq!(rename_original("geometry_encoder.points_direct_project.weight"), None);
        assert_eq!(rename_original("backbone.vision_backbone.sam2_convs.0.conv_1x1.weight"), None);
    }

    #[test]
    fn fused_qkv_splits_in_q_k_v_order() -> Result<()> {
        let t = Tensor::arange(0f32, 6.0, &Device::Cpu)?.reshape((6, 1))?;
        let mut out = HashMap::new();
        insert_converted(&mut out, "detr_encoder.layers.0.self_attn.in_proj_weight", t)?;
        let q = out["detr_encoder.layers.0.self_attn.q_proj.weight"].flatten_all()?.to_vec1::<f32>()?;
        let v = out["detr_encoder.layers.0.self_attn.v_proj.weight"].flatten_all()?.to_vec1::<f32>()?;
        assert_eq!((q, v), (vec![0.0, 1.0], vec![4.0, 5.0]));
        Ok(())
    }

    #[test]
    fn audit_lists_missing_misshaped_and_unexpected() {
        let dev = Device::Cpu;
        let mut m = HashMap::new();
        m.insert("a.weight".to_string(), Tensor::zeros((2, 3), DType::F32, &dev).unwrap());
        m.insert("b.weight".to_string(), Tensor::zeros(4, DType::F32, &dev).unwrap());
        m.insert("extra".to_string(), Tensor::zeros(1, DType::F32, &dev).unwrap());
        let ck = Checkpoint::from_tensors(m, Path::new("x.safetensors"));
        let vb = ck.var_builder(DType::F32, &dev);
        vb.get((2, 3), "a.weight").unwrap();
        vb.get(5, "b.weight").unwrap();
        vb.get(7, "c.weight").unwrap();
        let e = ck.finish().unwrap_err().to_string();
        assert!(e.contains("missing     c.weight"), "{e}");
        assert!(e.contains("mis-shaped  b.weight: model expects [5], checkpoint has [4]"), "{e}");
        assert!(e.contains("unexpected  extra"), "{e}");
    }
}
