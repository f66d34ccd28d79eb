//! From blended class scores to labels: argmax, largest connected component,
//! and softmax for saving probabilities.

use ndarray::{Array3, ArrayView4, ArrayViewMut4, Axis};
use rayon::prelude::*;

use super::InferenceError;

/// Voxels per parallel argmax task: large enough to amortise scheduling,
/// small enough that the running best scores stay in cache.
const ARGMAX_CHUNK: usize = 1 << 14;

/// Label of the highest-scoring class at every voxel of `logits`
/// (`[K, X, Y, Z]`). Ties go to the lowest class index, as in
/// `torch.argmax`/`numpy.argmax`. Fails if K is 0 or above 256 (labels are
/// u8) or if any score is NaN, which would make the label arbitrary.
pub fn argmax(logits: ArrayView4<'_, f32>) -> Result<Array3<u8>, InferenceError> {
    let (classes, nx, ny, nz) = logits.dim();
    if classes == 0 || classes > 256 {
        return Err(InferenceError::ClassCount(classes));
    }
    let logits = logits.as_standard_layout();
    let data = logits
        .as_slice()
        .ok_or_else(|| InferenceError::Shape("logits are not contiguous".into()))?;
    let voxels = nx * ny * nz;
    let mut labels = vec![0u8; voxels];
    let has_nan = labels
        .par_chunks_mut(ARGMAX_CHUNK)
        .enumerate()
        .map(|(chunk, out)| {
            let start = chunk * ARGMAX_CHUNK;
            let mut best = data[start..start + out.len()].to_vec();
            let mut nan = best.iter().any(|v| v.is_nan());
            for k in 1..classes {
                let scores = &data[k * voxels + start..][..out.len()];
                // k < 256, checked above.
                let label = k as u8;
                for ((l, b), &s) in out.iter_mut().zip(best.iter_mut()).zip(scores) {
                    nan |= s.is_nan();
                    // Strictly greater: the first maximum wins a tie.
                    if s > *b {
                        *b = s;
                        *l = label;
                    }
                }
            }
            nan
        })
        .reduce(|| false, |a, b| a || b);
    if has_nan {
        let first = data.iter().position(|v| v.is_nan()).unwrap_or(0);
        let (class, v) = (first / voxels, first % voxels);
        return Err(InferenceError::NanLogit {
            class,
            voxel: [v / (ny * nz), (v / nz) % ny, v % nz],
        });
    }
    Array3::from_shape_vec((nx, ny, nz), labels).map_err(|e| InferenceError::Shape(e.to_string()))
}

/// Turns per-class scores (`[K, X, Y, Z]`) into probabilities in place: a
/// softmax over K at every voxel, shifted by the maximum so large scores do
/// not overflow. A voxel with a NaN score becomes all NaN; infinite scores
/// share the probability among the classes at +inf (or uniformly when all
/// are -inf).
pub fn softmax_inplace(mut logits: ArrayViewMut4<'_, f32>) {
    let classes = logits.len_of(Axis(0));
    if classes == 0 {
        return;
    }
    for mut lane in logits.lanes_mut(Axis(0)) {
        if lane.iter().any(|v| v.is_nan()) {
            lane.fill(f32::NAN);
            continue;
        }
        let max = lane.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if max == f32::INFINITY {
            let top = lane.iter().filter(|&&v| v == f32::INFINITY).count() as f32;
            lane.mapv_inplace(|v| if v == f32::INFINITY { 1.0 / top } else { 0.0 });
        } else if max == f32::NEG_INFINITY {
            lane.fill(1.0 / classes as f32);
        } else {
            let mut sum = 0.0f32;
            for v in lane.iter_mut() {
                *v = (*v - max).exp();
                sum += *v;
            }
            // sum >= 1: the maximum contributes exp(0).
            lane.mapv_inplace(|v| v / sum);
        }
    }
}

/// Keeps only the largest 26-connected component of `label`; its other
/// components become background (0). Ties keep the component met first in
/// C order. Label 0 is left alone (removing background would be a no-op).
pub fn largest_component(labels: &mut Array3<u8>, label: u8) {
    let mut selected = [false; 256];
    selected[label as usize] = true;
    keep_largest(labels, &selected);
}

/// [`largest_component`] for every foreground label `1..num_labels`
/// (`num_labels` counts the background, like the model's classes). Labels
/// at or above `num_labels` are left alone. One pass for all labels.
pub fn keep_largest_component_per_label(labels: &mut Array3<u8>, num_labels: usize) {
    let mut selected = [false; 256];
    for s in selected.iter_mut().take(num_labels.min(256)).skip(1) {
        *s = true;
    }
    keep_largest(labels, &selected);
}

fn keep_largest(labels: &mut Array3<u8>, selected: &[bool; 256]) {
    let mut selected = *selected;
    selected[0] = false;
    if !selected.contains(&true) {
        return;
    }
    let dims = labels.dim();
    if let Some(data) = labels.as_slice_mut() {
        keep_largest_in(data, dims, &selected);
    } else {
        let mut standard = labels.as_standard_layout().into_owned();
        if let Some(data) = standard.as_slice_mut() {
            keep_largest_in(data, dims, &selected);
        }
        labels.assign(&standard);
    }
}

/// Fills the holes of every foreground label `1..num_labels`: background
/// (0) voxels that no 6-connected background path links to the volume's
/// border become the label that encloses them; then the same within every
/// 2D slice along each of the three axes. A brain mask then keeps its
/// ventricles, which are dark on T1 but inside the brain: in 3D they may
/// reach the outside through a thin gap (the fourth ventricle's exits),
/// within a slice they are enclosed. A background region touching two
/// labels (in 3D, or within the slice) is left alone: its owner is
/// ambiguous.
pub fn fill_holes_per_label(labels: &mut Array3<u8>, num_labels: usize) {
    let dims = labels.dim();
    let num_labels = num_labels.min(256) as u16;
    let mut standard = labels.as_standard_layout().into_owned();
    if let Some(data) = standard.as_slice_mut() {
        fill_holes_in(data, dims, num_labels);
    }
    let mut slice = Vec::new();
    for axis in 0..3 {
        for i in 0..standard.len_of(Axis(axis)) {
            let mut view = standard.index_axis_mut(Axis(axis), i);
            let (a, b) = view.dim();
            slice.clear();
            slice.extend(view.iter().copied());
            fill_holes_in(&mut slice, (a, b, 1), num_labels);
            for (dst, &src) in view.iter_mut().zip(&slice) {
                *dst = src;
            }
        }
    }
    labels.assign(&standard);
}

fn fill_holes_in(data: &mut [u8], (nx, ny, nz): (usize, usize, usize), num_labels: u16) {
    if data.is_empty() {
        return;
    }
    let idx = |x: usize, y: usize, z: usize| (x * ny + y) * nz + z;
    let neighbours = |v: usize| {
        let (x, y, z) = (v / (ny * nz), (v / nz) % ny, v % nz);
        let mut n = [usize::MAX; 6];
        if x > 0 {
            n[0] = idx(x - 1, y, z);
        }
        if x + 1 < nx {
            n[1] = idx(x + 1, y, z);
        }
        if y > 0 {
            n[2] = idx(x, y - 1, z);
        }
        if y + 1 < ny {
            n[3] = idx(x, y + 1, z);
        }
        if z > 0 {
            n[4] = idx(x, y, z - 1);
        }
        if z + 1 < nz {
            n[5] = idx(x, y, z + 1);
        }
        n
    };
    // Background reachable from the border is "outside".
    let mut outside = BitSet::new(data.len());
    let mut stack = Vec::new();
    for x in 0..nx {
        for y in 0..ny {
            for z in 0..nz {
                // An axis of length 1 has no outside: a single slice is
                // filled as the 2D image it is.
                let on_border = (nx > 1 && (x == 0 || x + 1 == nx))
                    || (ny > 1 && (y == 0 || y + 1 == ny))
                    || (nz > 1 && (z == 0 || z + 1 == nz));
                let v = idx(x, y, z);
                if on_border && data[v] == 0 && !outside.get(v) {
                    outside.set(v);
                    stack.push(v);
                }
            }
        }
    }
    while let Some(v) = stack.pop() {
        for u in neighbours(v) {
            if u != usize::MAX && data[u] == 0 && !outside.get(u) {
                outside.set(u);
                stack.push(u);
            }
        }
    }
    // Each enclosed background region goes to the one label around it.
    let mut seen = outside;
    let mut region = Vec::new();
    for v in 0..data.len() {
        if data[v] != 0 || seen.get(v) {
            continue;
        }
        region.clear();
        let mut owner: Option<u8> = None;
        let mut ambiguous = false;
        seen.set(v);
        stack.push(v);
        while let Some(w) = stack.pop() {
            region.push(w);
            for u in neighbours(w) {
                if u == usize::MAX {
                    continue;
                }
                match data[u] {
                    0 => {
                        if !seen.get(u) {
                            seen.set(u);
                            stack.push(u);
                        }
                    }
                    l if u16::from(l) < num_labels => match owner {
                        None => owner = Some(l),
                        Some(o) if o != l => ambiguous = true,
                        Some(_) => {}
                    },
                    // A label the model does not have: not ours to fill.
                    _ => ambiguous = true,
                }
            }
        }
        if let (Some(label), false) = (owner, ambiguous) {
            for &w in &region {
                data[w] = label;
            }
        }
    }
}

/// The flood fills work on linear indices of a C-order `[X, Y, Z]` buffer,
/// with one bit per voxel and an explicit stack: no recursion, memory linear
/// in the volume at worst.
fn keep_largest_in(data: &mut [u8], dims: (usize, usize, usize), selected: &[bool; 256]) {
    let mut visited = BitSet::new(data.len());
    let mut stack = Vec::new();
    // Per label: (seed voxel, size) of the largest component so far.
    let mut best = [(0usize, 0usize); 256];
    for v in 0..data.len() {
        let label = data[v] as usize;
        if !selected[label] || visited.get(v) {
            continue;
        }
        let size = flood(data, dims, v, &mut visited, &mut stack);
        if size > best[label].1 {
            best[label] = (v, size);
        }
    }
    // Storing every component's id would cost 4+ bytes a voxel; refilling
    // the winners from their seeds costs one more pass over them instead.
    visited.clear();
    for &(seed, size) in &best {
        if size > 0 {
            flood(data, dims, seed, &mut visited, &mut stack);
        }
    }
    for (v, label) in data.iter_mut().enumerate() {
        if selected[*label as usize] && !visited.get(v) {
            *label = 0;
        }
    }
}

/// Marks the 26-connected component of `seed` (voxels with its label) in
/// `visited` and returns its size.
fn flood(
    data: &[u8],
    (nx, ny, nz): (usize, usize, usize),
    seed: usize,
    visited: &mut BitSet,
    stack: &mut Vec<usize>,
) -> usize {
    let label = data[seed];
    visited.set(seed);
    stack.push(seed);
    let mut size = 0;
    while let Some(v) = stack.pop() {
        size += 1;
        let (x, y, z) = (v / (ny * nz), (v / nz) % ny, v % nz);
        for x0 in x.saturating_sub(1)..=(x + 1).min(nx - 1) {
            for y0 in y.saturating_sub(1)..=(y + 1).min(ny - 1) {
                let row = (x0 * ny + y0) * nz;
                for z0 in z.saturating_sub(1)..=(z + 1).min(nz - 1) {
                    let u = row + z0;
                    if data[u] == label && !visited.get(u) {
                        visited.set(u);
                        stack.push(u);
                    }
                }
            }
        }
    }
    size
}

struct BitSet(Vec<u64>);

impl BitSet {
    fn new(len: usize) -> Self {
        BitSet(vec![0; len.div_ceil(64)])
    }

    fn get(&self, i: usize) -> bool {
        self.0[i / 64] & (1 << (i % 64)) != 0
    }

    fn set(&mut self, i: usize) {
        self.0[i / 64] |= 1 << (i % 64);
    }

    fn clear(&mut self) {
        self.0.fill(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{Array, Array4, s};

    #[test]
    fn argmax_picks_the_best_class() {
        let mut logits = Array4::<f32>::zeros((3, 2, 3, 4));
        logits[[1, 0, 0, 0]] = 1.0;
        logits[[2, 1, 2, 3]] = 5.0;
        logits[[0, 1, 1, 1]] = 2.0;
        logits[[2, 1, 1, 1]] = 1.5;
        let labels = argmax(logits.view()).unwrap();
        assert_eq!(labels.dim(), (2, 3, 4));
        assert_eq!(labels[[0, 0, 0]], 1);
        assert_eq!(labels[[1, 2, 3]], 2);
        assert_eq!(labels[[1, 1, 1]], 0);
        // All-zero voxels: a three-way tie goes to class 0.
        assert_eq!(labels[[0, 1, 0]], 0);
    }

    #[test]
    fn argmax_ties_go_to_the_lowest_class() {
        let mut logits = Array4::<f32>::from_elem((4, 1, 1, 3), -1.0);
        logits[[1, 0, 0, 0]] = 3.0;
        logits[[3, 0, 0, 0]] = 3.0;
        logits[[2, 0, 0, 1]] = f32::INFINITY;
        logits[[3, 0, 0, 1]] = f32::INFINITY;
        let labels = argmax(logits.view()).unwrap();
        assert_eq!(labels.as_slice().unwrap(), &[1, 2, 0]);
    }

    #[test]
    fn argmax_class_limits() {
        assert!(matches!(
            argmax(Array4::<f32>::zeros((0, 2, 2, 2)).view()),
            Err(InferenceError::ClassCount(0))
        ));
        assert!(matches!(
            argmax(Array4::<f32>::zeros((257, 1, 1, 1)).view()),
            Err(InferenceError::ClassCount(257))
        ));
        let mut logits = Array4::<f32>::zeros((256, 1, 1, 2));
        logits[[255, 0, 0, 1]] = 1.0;
        assert_eq!(
            argmax(logits.view()).unwrap().as_slice().unwrap(),
            &[0, 255]
        );
    }

    #[test]
    fn argmax_refuses_nan() {
        let mut logits = Array4::<f32>::zeros((2, 3, 4, 5));
        logits[[1, 2, 1, 3]] = f32::NAN;
        let e = argmax(logits.view()).unwrap_err();
        assert!(
            matches!(
                e,
                InferenceError::NanLogit {
                    class: 1,
                    voxel: [2, 1, 3]
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("NaN"));
        // Also when the NaN is in class 0.
        let mut logits = Array4::<f32>::zeros((2, 3, 4, 5));
        logits[[0, 0, 0, 4]] = f32::NAN;
        assert!(argmax(logits.view()).is_err());
    }

    #[test]
    fn argmax_large_and_strided() {
        // More voxels than one parallel chunk, and a non-standard layout.
        let logits = Array::from_shape_fn((3, 40, 30, 20), |(c, x, y, z)| {
            ((x * 7 + y * 3 + z + c * 11) % 13) as f32
        });
        let want = Array::from_shape_fn((40, 30, 20), |(x, y, z)| {
            (0..3)
                .max_by(|&a, &b| {
                    logits[[a, x, y, z]]
                        .partial_cmp(&logits[[b, x, y, z]])
                        .unwrap()
                        .then(b.cmp(&a))
                })
                .unwrap() as u8
        });
        assert_eq!(argmax(logits.view()).unwrap(), want);
        let mut flipped = logits.clone();
        flipped.invert_axis(Axis(2));
        let mut want_flipped = want.clone();
        want_flipped.invert_axis(Axis(1));
        assert_eq!(argmax(flipped.view()).unwrap(), want_flipped);
    }

    #[test]
    fn softmax_sums_to_one() {
        let mut logits = Array::from_shape_fn((3, 2, 2, 2), |(c, x, y, z)| {
            (c as f32 - 1.0) * (x + 2 * y + 3 * z) as f32 * 100.0
        });
        logits[[0, 1, 1, 1]] = f32::NAN;
        logits
            .slice_mut(s![.., 0, 0, 1])
            .assign(&ndarray::arr1(&[f32::NEG_INFINITY; 3]));
        logits.slice_mut(s![.., 0, 1, 0]).assign(&ndarray::arr1(&[
            f32::INFINITY,
            0.0,
            f32::INFINITY,
        ]));
        softmax_inplace(logits.view_mut());
        for x in 0..2 {
            for y in 0..2 {
                for z in 0..2 {
                    let p = logits.slice(s![.., x, y, z]);
                    if (x, y, z) == (1, 1, 1) {
                        assert!(p.iter().all(|v| v.is_nan()));
                    } else {
                        assert!((p.sum() - 1.0).abs() < 1e-6, "{p}");
                        assert!(p.iter().all(|&v| (0.0..=1.0).contains(&v)));
                    }
                }
            }
        }
        assert_eq!(logits.slice(s![.., 0, 1, 0]).to_vec(), vec![0.5, 0.0, 0.5]);
        assert!((logits[[0, 0, 0, 1]] - 1.0 / 3.0).abs() < 1e-7);
        // 0 scores everywhere in (0,0,0): uniform.
        assert!((logits[[2, 0, 0, 0]] - 1.0 / 3.0).abs() < 1e-6);
    }

    fn blob(labels: &mut Array3<u8>, from: [usize; 3], to: [usize; 3], label: u8) {
        labels
            .slice_mut(s![from[0]..to[0], from[1]..to[1], from[2]..to[2]])
            .fill(label);
    }

    #[test]
    fn fill_holes_fills_enclosed_background_only() {
        // A hollow 5x5x5 cube of label 1 with a 3x3x3 hole, and a notch
        // open to the outside that must stay background.
        let mut labels = Array3::<u8>::zeros((7, 7, 7));
        for x in 1..6 {
            for y in 1..6 {
                for z in 1..6 {
                    labels[[x, y, z]] = 1;
                }
            }
        }
        for x in 2..5 {
            for y in 2..5 {
                for z in 2..5 {
                    labels[[x, y, z]] = 0;
                }
            }
        }
        labels[[1, 3, 3]] = 0;
        labels[[0, 3, 3]] = 0;
        // Open to the border in 3D, enclosed within the slices through it
        // (like ventricles and the fourth ventricle's exits): filled.
        let mut open = labels.clone();
        fill_holes_per_label(&mut open, 2);
        assert_eq!(open[[3, 3, 3]], 1);
        assert_eq!(open[[1, 3, 3]], 1);
        assert_eq!(open[[0, 3, 3]], 0, "the border stays background");

        labels[[1, 3, 3]] = 1;
        let mut closed = labels.clone();
        fill_holes_per_label(&mut closed, 2);
        assert_eq!(closed[[3, 3, 3]], 1);
        assert_eq!(closed.iter().filter(|&&l| l == 1).count(), 125);
        assert_eq!(closed[[0, 0, 0]], 0);
    }

    #[test]
    fn fill_holes_keeps_a_slot_open_to_the_outside_in_every_slice() {
        let mut labels = Array3::<u8>::zeros((6, 6, 6));
        blob(&mut labels, [1, 1, 1], [5, 5, 5], 1);
        for y in 1..5 {
            labels[[3, y, 3]] = 0;
            labels[[3, y, 4]] = 0;
        }
        let mut filled = labels.clone();
        fill_holes_per_label(&mut filled, 2);
        assert_eq!(filled, labels);
    }

    #[test]
    fn fill_holes_fills_the_lumen_of_a_tube_open_at_both_ends() {
        let mut labels = Array3::<u8>::zeros((7, 7, 5));
        blob(&mut labels, [1, 1, 0], [6, 6, 5], 1);
        for x in 2..5 {
            for y in 2..5 {
                for z in 0..5 {
                    labels[[x, y, z]] = 0;
                }
            }
        }
        fill_holes_per_label(&mut labels, 2);
        assert!((2..5).all(|x| (2..5).all(|y| (0..5).all(|z| labels[[x, y, z]] == 1))));
        assert_eq!(labels[[0, 0, 0]], 0);
    }

    #[test]
    fn fill_holes_leaves_regions_between_two_labels() {
        let mut labels = Array3::<u8>::from_elem((5, 5, 3), 1);
        for x in 0..5 {
            for z in 0..3 {
                labels[[x, 4, z]] = 2;
            }
        }
        // Touches 1 and 2 in 3D and within each slice through it.
        labels[[2, 3, 1]] = 0;
        labels[[2, 3, 2]] = 2;
        labels[[2, 1, 1]] = 0; // inside 1 only
        let mut filled = labels.clone();
        fill_holes_per_label(&mut filled, 3);
        assert_eq!(filled[[2, 3, 1]], 0);
        assert_eq!(filled[[2, 1, 1]], 1);
    }

    #[test]
    fn largest_component_removes_smaller_ones() {
        let mut labels = Array3::<u8>::zeros((10, 10, 10));
        blob(&mut labels, [0, 0, 0], [3, 3, 3], 1); // 27 voxels
        blob(&mut labels, [6, 6, 6], [8, 8, 8], 1); // 8 voxels
        blob(&mut labels, [0, 6, 0], [1, 7, 1], 1); // 1 voxel
        blob(&mut labels, [5, 0, 0], [6, 1, 1], 2); // another label, untouched
        largest_component(&mut labels, 1);
        assert_eq!(labels.iter().filter(|&&v| v == 1).count(), 27);
        assert_eq!(labels[[7, 7, 7]], 0);
        assert_eq!(labels[[0, 6, 0]], 0);
        assert_eq!(labels[[5, 0, 0]], 2);
    }

    #[test]
    fn diagonal_neighbours_are_connected() {
        // A chain touching only at corners is one 26-connected component
        // of 5 voxels, bigger than the 4-voxel bar.
        let mut labels = Array3::<u8>::zeros((6, 6, 6));
        for i in 0..5 {
            labels[[i, i, i]] = 1;
        }
        blob(&mut labels, [0, 5, 0], [4, 6, 1], 1);
        largest_component(&mut labels, 1);
        assert_eq!(labels.iter().filter(|&&v| v == 1).count(), 5);
        assert_eq!(labels[[4, 4, 4]], 1);
        assert_eq!(labels[[0, 5, 0]], 0);
    }

    #[test]
    fn equal_sizes_keep_the_first() {
        let mut labels = Array3::<u8>::zeros((5, 1, 5));
        labels[[0, 0, 0]] = 3;
        labels[[4, 0, 4]] = 3;
        largest_component(&mut labels, 3);
        assert_eq!(labels[[0, 0, 0]], 3);
        assert_eq!(labels[[4, 0, 4]], 0);
    }

    #[test]
    fn per_label_components() {
        let mut labels = Array3::<u8>::zeros((8, 8, 4));
        blob(&mut labels, [0, 0, 0], [2, 2, 2], 1); // 8
        blob(&mut labels, [5, 5, 0], [6, 6, 1], 1); // 1
        // Label 2 touches label 1's big blob: labels are separate all the same.
        blob(&mut labels, [2, 0, 0], [3, 1, 1], 2); // 1
        blob(&mut labels, [4, 0, 0], [7, 2, 2], 2); // 12
        blob(&mut labels, [7, 7, 3], [8, 8, 4], 5); // beyond num_labels
        blob(&mut labels, [0, 7, 3], [1, 8, 4], 5);
        let mut strided = labels.clone();
        keep_largest_component_per_label(&mut labels, 3);
        assert_eq!(labels.iter().filter(|&&v| v == 1).count(), 8);
        assert_eq!(labels.iter().filter(|&&v| v == 2).count(), 12);
        assert_eq!(labels.iter().filter(|&&v| v == 5).count(), 2);
        assert_eq!(labels[[2, 0, 0]], 0);

        // Same answer on a non-standard layout.
        strided.invert_axis(Axis(1));
        keep_largest_component_per_label(&mut strided, 3);
        strided.invert_axis(Axis(1));
        assert_eq!(strided, labels);
    }

    #[test]
    fn one_big_component_is_not_recursive() {
        // A snake through a whole volume: deep for a recursive fill.
        let (nx, ny, nz) = (64, 64, 64);
        let mut labels = Array3::<u8>::zeros((nx, ny, nz));
        for x in (0..nx).step_by(2) {
            labels.slice_mut(s![x, .., ..]).fill(1);
            let y = if (x / 2) % 2 == 0 { ny - 1 } else { 0 };
            if x + 1 < nx {
                labels[[x + 1, y, 0]] = 1;
            }
        }
        let total = labels.iter().filter(|&&v| v == 1).count();
        labels[[1, 30, 30]] = 1; // touches the big one: stays
        largest_component(&mut labels, 1);
        assert_eq!(labels.iter().filter(|&&v| v == 1).count(), total + 1);
    }
}
