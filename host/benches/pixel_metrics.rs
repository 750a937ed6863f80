//! Pixel-metrics cost per validation pair: `cargo bench --bench pixel_metrics`. Numbers in
//! BENCHMARKS.md.
//!
//! A pair costs two skeletons and two dilations on the mask grid (288² for SAM3). Measured on a
//! thin crack (the case the metrics are for) and on a disk filling most of the grid (the worst
//! case: a skeleton takes as many thinning passes as the object's radius).

use lorahost::evaluation::{EvalQuery, Prediction};
use lorahost::pixel_metrics::pixel_metrics;
use std::time::Instant;

const SIDE: usize = 288;

fn mask(f: impl Fn(f64, f64) -> bool) -> Vec<bool> {
    (0..SIDE * SIDE).map(|i| f((i % SIDE) as f64, (i / SIDE) as f64)).collect()
}

fn time(name: &str, gt: Vec<bool>, pred: Vec<bool>) {
    let q = EvalQuery {
        image_id: 1,
        prompt: "crack".into(),
        height: SIDE,
        width: SIDE,
        gt_masks: vec![gt],
        predictions: vec![Prediction { score: 0.9, mask: pred }],
    };
    let pairs: Vec<&EvalQuery> = vec![&q; 20];
    let start = Instant::now();
    let m = pixel_metrics(&pairs, 0.5, 2).unwrap().unwrap();
    let each = start.elapsed().as_secs_f64() * 1000.0 / pairs.len() as f64;
    println!("{name}: {each:.2} ms per pair (relaxed F1 {:.3}, clDice {:.3})", m.relaxed_f1, m.cldice);
}

fn main() {
    let crack = |dy: f64| mask(move |x, y| (y - (100.0 + 0.3 * x + dy)).abs() < 1.5);
    time("thin crack, prediction 1 px off", crack(0.0), crack(1.0));
    let disk = |r: f64| mask(move |x, y| (x - 144.0).powi(2) + (y - 144.0).powi(2) < r * r);
    time("disk of radius 130, prediction radius 125", disk(130.0), disk(125.0));
}
