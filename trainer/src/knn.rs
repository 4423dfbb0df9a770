//! Weighted k-NN classification on frozen features (the DINO protocol, Caron et al. 2021,
//! `eval_knn.py`): features are L2-normalised; for each query the k most cosine-similar training
//! features vote for their class with weight `exp(similarity / T)`; every class is ranked by its
//! summed votes — classes without votes after those with votes, ties in class-index order (a
//! stable sort of all classes, where DINO sorts its whole `probs` row) — and top-5 looks at the
//! first min(5, k) places. Defaults k = 20, T = 0.07.
//!
//! The similarity matrix and the top-k run on the backend in chunks of queries (a GPU does
//! ImageNet's 50k x 1.28M in seconds); the votes are summed on the host.

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use serde::Serialize;

use crate::CaeError;

/// Result of one k-NN evaluation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KnnResult {
    /// Fraction of queries whose top-ranked class is right.
    pub top1: f64,
    /// Fraction whose class is among the 5 top-ranked.
    pub top5: f64,
    pub k: usize,
    pub temperature: f64,
    pub train_samples: usize,
    pub val_samples: usize,
    pub classes: usize,
}

fn l2_normalise(x: &[f32], dim: usize) -> Vec<f32> {
    let mut out = x.to_vec();
    for row in out.chunks_exact_mut(dim) {
        let n = row.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
        row.iter_mut().for_each(|v| *v /= n);
    }
    out
}

/// Weighted k-NN top-1/top-5 of `val` against `train` (row-major `[n, dim]` features). Samples
/// with a negative label are left out (unlabeled). `k` is capped at the number of training
/// samples. Top-5 looks at min(5, k) places, as DINO's `eval_knn.py` does.
#[allow(clippy::too_many_arguments)]
pub fn weighted_knn<B: Backend>(
    train: &[f32],
    train_labels: &[i64],
    val: &[f32],
    val_labels: &[i64],
    dim: usize,
    k: usize,
    temperature: f64,
    device: &B::Device,
) -> Result<KnnResult, CaeError> {
    let keep = |x: &[f32], labels: &[i64]| -> (Vec<f32>, Vec<i64>) {
        let mut f = Vec::with_capacity(x.len());
        let mut l = Vec::with_capacity(labels.len());
        for (row, &lab) in x.chunks_exact(dim).zip(labels) {
            if lab >= 0 {
                f.extend_from_slice(row);
                l.push(lab);
            }
        }
        (f, l)
    };
    let (train, train_labels) = keep(train, train_labels);
    let (val, val_labels) = keep(val, val_labels);
    let (nt, nv) = (train_labels.len(), val_labels.len());
    if nt == 0 || nv == 0 {
        return Err(CaeError::Data(format!("k-NN needs labeled samples: {nt} train, {nv} val")));
    }
    if k == 0 || temperature <= 0.0 {
        return Err(CaeError::Config(format!("k-NN: k {k} and temperature {temperature} must be positive")));
    }
    let k = k.min(nt);
    let classes = train_labels.iter().chain(&val_labels).copied().max().unwrap_or(0) as usize + 1;
    let train_t = Tensor::<B, 2>::from_data(TensorData::new(l2_normalise(&train, dim), [nt, dim]), device).transpose(); // [dim, nt]
    let val = l2_normalise(&val, dim);
    // Queries per chunk: keeps the [chunk, nt] similarity matrix near 64M entries.
    let chunk = (64_000_000 / nt).clamp(1, 1024);
    let (mut top1, mut top5) = (0usize, 0usize);
    // DINO counts top-5 over min(5, k) places of the ranking of all classes: a class without
    // votes can be among them (after every class with votes), as in DINO.
    let top5_places = k.min(5);
    let mut votes = vec![0f64; classes];
    for (c, (rows, labels)) in val.chunks(chunk * dim).zip(val_labels.chunks(chunk)).enumerate() {
        let q = rows.len() / dim;
        let queries = Tensor::<B, 2>::from_data(TensorData::new(rows.to_vec(), [q, dim]), device); // [q, dim]
        let sim = queries.matmul(train_t.clone()); // [q, nt]
        let (vals, idx) = sim.topk_with_indices(k, 1); // [q, k] each
        let vals = vals
            .into_data()
            .convert::<f32>()
            .to_vec::<f32>()
            .map_err(|e| CaeError::Data(format!("k-NN similarities (chunk {c}): {e:?}")))?;
        let idx = idx
            .into_data()
            .convert::<i64>()
            .to_vec::<i64>()
            .map_err(|e| CaeError::Data(format!("k-NN indices (chunk {c}): {e:?}")))?;
        for (i, &label) in labels.iter().enumerate() {
            votes.iter_mut().for_each(|v| *v = 0.0);
            for j in 0..k {
                let t = idx[i * k + j] as usize;
                votes[train_labels[t] as usize] += (f64::from(vals[i * k + j]) / temperature).exp();
            }
            let rank = rank_of(&votes, label as usize);
            top1 += usize::from(rank == 0);
            top5 += usize::from(rank < top5_places);
        }
    }
    Ok(KnnResult {
        top1: top1 as f64 / nv as f64,
        top5: top5 as f64 / nv as f64,
        k,
        temperature,
        train_samples: nt,
        val_samples: nv,
        classes,
    })
}

/// Place of class `class` when every class is sorted by votes, descending, ties in class-index
/// order (a stable sort): the classes with strictly more votes, and those with as many and a
/// lower index, come before it. A class without votes comes after every class with votes.
fn rank_of(votes: &[f64], class: usize) -> usize {
    let mine = votes[class];
    votes.iter().enumerate().filter(|&(c, &v)| v > mine || (v == mine && c < class)).count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use rand::{RngExt, SeedableRng};

    fn knn(train: &[f32], tl: &[i64], val: &[f32], vl: &[i64], dim: usize, k: usize) -> KnnResult {
        weighted_knn::<Flex>(train, tl, val, vl, dim, k, 0.07, &Default::default()).unwrap()
    }

    /// A hand-worked case in 2-D. Query at 30° (true class 0). Train: class 2 at 31° (cos 1° =
    /// 0.99985), class 0 at 20° and 40° (cos 10° = 0.98481 each), class 1 at 90°.
    /// - k = 1: only class 2 votes: top-1 wrong; top-5 is capped at k = 1 places, so wrong too.
    /// - k = 3, T = 0.07: class 0 gets 2·e^14.069, class 2 e^14.284 = 1.24·e^14.069: class 0 wins.
    /// - k = 3, T = 0.01: class 2 gets e^99.985 = 4.5·e^98.481 > class 0's 2·e^98.481: class 2
    ///   wins at top-1, class 0 is second (top-5).
    #[test]
    fn hand_worked_votes() {
        let p = |deg: f32| [deg.to_radians().cos(), deg.to_radians().sin()];
        let train: Vec<f32> = [31.0, 20.0, 40.0, 90.0].iter().flat_map(|&a| p(a)).collect();
        let tl = [2, 0, 0, 1];
        let q = p(30.0);
        let r = knn(&train, &tl, &q, &[0], 2, 1);
        assert_eq!((r.top1, r.top5, r.classes), (0.0, 0.0, 3));
        let r = knn(&train, &tl, &q, &[0], 2, 3);
        assert_eq!((r.top1, r.top5), (1.0, 1.0));
        let r = weighted_knn::<Flex>(&train, &tl, &q, &[0], 2, 3, 0.01, &Default::default()).unwrap();
        assert_eq!((r.top1, r.top5), (0.0, 1.0));
        // Scale does not matter (cosine); unlabeled queries are left out.
        let scaled: Vec<f32> = q.iter().map(|v| v * 7.0).collect();
        let r = knn(&train, &tl, &[scaled, vec![1.0, 0.0]].concat(), &[0, -1], 2, 3);
        assert_eq!((r.top1, r.val_samples), (1.0, 1));
    }

    /// Regression: top-5 never counted a class without votes, where DINO ranks all classes (those
    /// without votes after those with votes) and finds it when it falls in the first min(5, k)
    /// places. Query at 0° of class 0; train: class 2 at 1° and 2°, class 3 at 3°, classes 0, 1
    /// and 4 far away (180°, 180°, 179°). With k = 3 only classes 2 and 3 vote: the ranking is
    /// 2, 3, then the voteless 0, 1, 4 in index order: class 0 is third, inside min(5, 3) places.
    #[test]
    fn top5_ranks_classes_without_votes_after_those_with_votes() {
        let p = |deg: f32| [deg.to_radians().cos(), deg.to_radians().sin()];
        let train: Vec<f32> = [1.0, 2.0, 3.0, 180.0, 180.0, 179.0].iter().flat_map(|&a| p(a)).collect();
        let tl = [2, 2, 3, 0, 1, 4];
        let r = knn(&train, &tl, &p(0.0), &[0], 2, 3);
        assert_eq!((r.top1, r.top5), (0.0, 1.0), "class 0 is third");
        // Class 4 has no votes either but a higher index: fifth, outside 3 places.
        let r = knn(&train, &tl, &p(0.0), &[4], 2, 3);
        assert_eq!((r.top1, r.top5), (0.0, 0.0), "class 4 is fifth (after 2, 3, 0, 1)");
        // With k = 2 only class 2 votes: 2, then 0 (second of 2 places), 1, 3, 4.
        let r = knn(&train, &tl, &[p(0.0), p(0.0)].concat(), &[0, 1], 2, 2);
        assert_eq!(r.top5, 0.5, "class 0 second (found), class 1 third (outside 2 places)");
        // The order itself: votes descending, ties by class index.
        let votes = [0.0, 2.0, 0.0, 2.0, 5.0];
        let places: Vec<usize> = (0..5).map(|c| rank_of(&votes, c)).collect();
        assert_eq!(places, [3, 1, 4, 2, 0]);
    }

    /// Against a brute-force f64 implementation (sort all similarities) on random data.
    #[test]
    fn matches_brute_force() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        let (dim, nt, nv, classes, k) = (8, 200, 60, 7, 20);
        let train: Vec<f32> = (0..nt * dim).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let val: Vec<f32> = (0..nv * dim).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let tl: Vec<i64> = (0..nt).map(|_| rng.random_range(0..classes)).collect();
        let vl: Vec<i64> = (0..nv).map(|_| rng.random_range(0..classes)).collect();
        let norm = |r: &[f32]| r.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>().sqrt();
        let (mut t1, mut t5) = (0, 0);
        for (q, &label) in val.chunks(dim).zip(&vl) {
            let mut sims: Vec<(f64, i64)> = train
                .chunks(dim)
                .zip(&tl)
                .map(|(t, &l)| {
                    (q.iter().zip(t).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum::<f64>() / (norm(q) * norm(t)), l)
                })
                .collect();
            sims.sort_by(|a, b| b.0.total_cmp(&a.0));
            let mut votes = vec![0f64; classes as usize];
            for &(s, l) in &sims[..k] {
                votes[l as usize] += (s / 0.07).exp();
            }
            let mut order: Vec<usize> = (0..classes as usize).collect();
            order.sort_by(|&a, &b| votes[b].total_cmp(&votes[a]));
            t1 += usize::from(order[0] == label as usize);
            t5 += usize::from(order[..5].contains(&(label as usize)));
        }
        let r = knn(&train, &tl, &val, &vl, dim, k);
        assert_eq!(r.top1, t1 as f64 / nv as f64);
        assert_eq!(r.top5, t5 as f64 / nv as f64);
        assert!(r.top5 > r.top1);
    }
}
