//! Running a batch in parts a model accepts, and putting the outputs back
//! together: the one place backends split a batch of windows.
//!
//! A model exported at a fixed batch (usually 1) still serves any batch the
//! runtime sends: [`Split`] cuts the input into parts of at most that many
//! items (the last part holds the remainder), the backend runs each part its
//! own way (in order, or in parallel), and [`Concat`] joins the outputs along
//! the batch axis. Every part's output must be batch-first with its part's
//! batch and the same item shape as the others; anything else is an error,
//! not a silently mangled tensor.

use crate::{BackendError, Tensor, TensorInfo};

/// A batch (batch dimension first) cut into parts of at most `per_part`
/// items.
#[derive(Clone, Copy, Debug)]
pub struct Split<'a> {
    data: &'a [f32],
    shape: &'a [usize],
    item_len: usize,
    per_part: usize,
}

/// One part of a [`Split`]: its values and its shape (the batch's, with the
/// part's own batch first).
#[derive(Clone, Debug, PartialEq)]
pub struct Part<'a> {
    pub data: &'a [f32],
    pub shape: Vec<usize>,
}

impl<'a> Split<'a> {
    /// Cuts `data` of `shape` into parts of `per_part` items (0 is taken as
    /// 1). `data` must hold exactly the values `shape` asks for.
    pub fn new(data: &'a [f32], shape: &'a [usize], per_part: usize) -> Result<Self, BackendError> {
        let Some((_, item)) = shape.split_first() else {
            return Err(BackendError::InvalidArgument(
                "a batch needs a batch dimension; the shape is empty".into(),
            ));
        };
        let item_len = item
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| BackendError::InvalidArgument(format!("shape {shape:?} overflows")))?;
        let want = item_len
            .checked_mul(shape[0])
            .ok_or_else(|| BackendError::InvalidArgument(format!("shape {shape:?} overflows")))?;
        if want != data.len() {
            return Err(BackendError::InvalidArgument(format!(
                "shape {shape:?} needs {want} values, the batch holds {}",
                data.len()
            )));
        }
        Ok(Split {
            data,
            shape,
            item_len,
            per_part: per_part.max(1),
        })
    }

    /// Items in the whole batch.
    pub fn batch(&self) -> usize {
        self.shape[0]
    }

    /// Number of parts.
    pub fn len(&self) -> usize {
        self.batch().div_ceil(self.per_part)
    }

    /// An empty batch has no parts.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Items in part `index` (the last part may hold fewer).
    fn part_batch(&self, index: usize) -> usize {
        let start = index.saturating_mul(self.per_part);
        self.batch().saturating_sub(start).min(self.per_part)
    }

    /// Part `index`, or `None` past the last.
    pub fn part(&self, index: usize) -> Option<Part<'a>> {
        (index < self.len()).then(|| self.part_within(index))
    }

    /// Part `index`, known to be below [`Split::len`].
    fn part_within(&self, index: usize) -> Part<'a> {
        let items = self.part_batch(index);
        let start = index * self.per_part * self.item_len;
        let mut shape = self.shape.to_vec();
        shape[0] = items;
        Part {
            data: &self.data[start..start + items * self.item_len],
            shape,
        }
    }

    /// The parts, in batch order.
    pub fn parts(&self) -> impl ExactSizeIterator<Item = Part<'a>> + '_ {
        (0..self.len()).map(|i| self.part_within(i))
    }

    /// Runs the parts one after the other with `run` and joins the outputs;
    /// `output` (the model's declared output) answers an empty batch.
    pub fn run_in_order(
        &self,
        output: &TensorInfo,
        mut run: impl FnMut(&[f32], &[usize]) -> Result<Tensor, BackendError>,
    ) -> Result<Tensor, BackendError> {
        let mut concat = Concat::new(*self);
        for part in self.parts() {
            concat.push(run(part.data, &part.shape)?)?;
        }
        concat.finish(output)
    }

    /// Joins the outputs of every part, in part order (e.g. collected from a
    /// parallel run); `output` answers an empty batch.
    pub fn concat(
        &self,
        outputs: impl IntoIterator<Item = Tensor>,
        output: &TensorInfo,
    ) -> Result<Tensor, BackendError> {
        let mut concat = Concat::new(*self);
        for t in outputs {
            concat.push(t)?;
        }
        concat.finish(output)
    }
}

/// The outputs of a [`Split`]'s parts, joined along the batch axis as they
/// arrive (in part order), each checked against its part.
pub struct Concat<'a> {
    split: Split<'a>,
    pushed: usize,
    /// The first part's output shape, batch dimension set to the whole
    /// batch.
    shape: Vec<usize>,
    data: Vec<f32>,
    /// The output of a batch that ran as one part: returned as it is.
    whole: Option<Tensor>,
}

impl<'a> Concat<'a> {
    pub fn new(split: Split<'a>) -> Self {
        Concat {
            split,
            pushed: 0,
            shape: Vec::new(),
            data: Vec::new(),
            whole: None,
        }
    }

    /// Appends the output of the next part.
    pub fn push(&mut self, out: Tensor) -> Result<(), BackendError> {
        let index = self.pushed;
        if index >= self.split.len() {
            return Err(BackendError::Run(format!(
                "{} outputs for a batch cut into {} parts",
                index + 1,
                self.split.len()
            )));
        }
        let items = self.split.part_batch(index);
        let got = out.shape();
        if got.first() != Some(&items) {
            return Err(BackendError::Run(format!(
                "the model produced shape {got:?} for {items} item(s); the batch must come first"
            )));
        }
        if index == 0 {
            let mut shape = got.to_vec();
            shape[0] = self.split.batch();
            // Items of one batch have outputs of one size: reserve for all.
            let per_item = out.data().len() / items.max(1);
            let total = per_item.checked_mul(self.split.batch()).ok_or_else(|| {
                BackendError::Run(format!("an output of shape {shape:?} overflows"))
            })?;
            self.shape = shape;
            if self.split.len() == 1 {
                self.whole = Some(out);
            } else {
                self.data.reserve_exact(total);
                self.data.extend_from_slice(out.data());
            }
        } else {
            if got[1..] != self.shape[1..] {
                let mut first = self.shape.clone();
                first[0] = self.split.part_batch(0);
                return Err(BackendError::Run(format!(
                    "batch items produced different shapes: {first:?} and {got:?}"
                )));
            }
            self.data.extend_from_slice(out.data());
        }
        self.pushed += 1;
        Ok(())
    }

    /// The joined output, once every part's is in. An empty batch has the
    /// declared `output`'s shape with a batch of 0, if it is fixed past the
    /// batch.
    pub fn finish(self, output: &TensorInfo) -> Result<Tensor, BackendError> {
        if self.split.is_empty() {
            return empty_output(self.split.shape, output);
        }
        if self.pushed != self.split.len() {
            return Err(BackendError::Run(format!(
                "{} outputs for a batch cut into {} parts",
                self.pushed,
                self.split.len()
            )));
        }
        match self.whole {
            Some(whole) => Ok(whole),
            None => Tensor::from_vec(self.shape, self.data),
        }
    }
}

/// The output of an empty batch (`in_shape` has a batch of 0), answered
/// without running the model: the declared output's shape with batch 0.
pub fn empty_output(in_shape: &[usize], output: &TensorInfo) -> Result<Tensor, BackendError> {
    let mut dims = vec![0usize];
    for d in output.shape.iter().skip(1) {
        dims.push(d.fixed().ok_or_else(|| {
            BackendError::Run(format!(
                "an empty batch ({in_shape:?}) of a model whose output {output} is only known at \
                 run time"
            ))
        })?);
    }
    Tensor::from_vec(dims, Vec::new())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Dim;

    fn output() -> TensorInfo {
        TensorInfo {
            name: "y".into(),
            shape: vec![Dim::Symbolic("N".into()), Dim::Fixed(2)],
        }
    }

    /// A model of input [n, 3] whose output is [n, 2]: each item's sum and
    /// its first value.
    fn run(data: &[f32], shape: &[usize]) -> Result<Tensor, BackendError> {
        let out = data
            .chunks_exact(3)
            .flat_map(|item| [item.iter().sum(), item[0]])
            .collect();
        Tensor::from_vec(vec![shape[0], 2], out)
    }

    fn batch(n: usize) -> Vec<f32> {
        (0..n * 3).map(|v| v as f32).collect()
    }

    #[test]
    fn splits_into_parts_with_a_remainder() {
        let data = batch(5);
        let shape = [5, 3];
        let split = Split::new(&data, &shape, 2).unwrap();
        assert_eq!(split.len(), 3);
        let parts: Vec<Part<'_>> = split.parts().collect();
        assert_eq!(parts[0].shape, [2, 3]);
        assert_eq!(parts[0].data, &data[..6]);
        assert_eq!(parts[1].data, &data[6..12]);
        assert_eq!(parts[2].shape, [1, 3], "the last part holds the remainder");
        assert_eq!(parts[2].data, &data[12..]);
        assert_eq!(split.part(3), None);
    }

    #[test]
    fn joined_outputs_equal_one_whole_run() {
        let data = batch(5);
        let shape = [5, 3];
        let whole = run(&data, &shape).unwrap();
        for per_part in [0, 1, 2, 3, 5, 8] {
            let split = Split::new(&data, &shape, per_part).unwrap();
            let joined = split.run_in_order(&output(), run).unwrap();
            assert_eq!(joined.shape(), whole.shape(), "per part {per_part}");
            assert_eq!(joined.data(), whole.data(), "per part {per_part}");
            let outs: Vec<Tensor> = split
                .parts()
                .map(|p| run(p.data, &p.shape).unwrap())
                .collect();
            assert_eq!(split.concat(outs, &output()).unwrap().data(), whole.data());
        }
    }

    #[test]
    fn a_part_output_without_its_batch_first_is_an_error() {
        let data = batch(3);
        let shape = [3, 3];
        let split = Split::new(&data, &shape, 1).unwrap();
        let e = split
            .run_in_order(&output(), |_, _| Tensor::from_vec(vec![2, 1], vec![0.0; 2]))
            .unwrap_err();
        assert!(
            matches!(&e, BackendError::Run(m) if m.contains("batch must come first")),
            "{e}"
        );
    }

    #[test]
    fn parts_with_different_item_shapes_are_an_error() {
        let data = batch(3);
        let shape = [3, 3];
        let split = Split::new(&data, &shape, 1).unwrap();
        let mut calls = 0;
        let e = split
            .run_in_order(&output(), |_, _| {
                calls += 1;
                Tensor::from_vec(vec![1, calls], vec![0.0; calls])
            })
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("different shapes: [1, 1] and [1, 2]"),
            "{e}"
        );
    }

    #[test]
    fn too_few_or_too_many_outputs_are_an_error() {
        let data = batch(4);
        let shape = [4, 3];
        let split = Split::new(&data, &shape, 2).unwrap();
        let one = || run(&data[..6], &[2, 3]).unwrap();
        assert!(split.concat([one()], &output()).is_err());
        assert!(split.concat([one(), one(), one()], &output()).is_err());
        assert!(split.concat([one(), one()], &output()).is_ok());
    }

    #[test]
    fn a_length_that_does_not_fit_the_shape_is_refused() {
        let data = batch(2);
        assert!(Split::new(&data, &[3, 3], 1).is_err());
        assert!(Split::new(&data, &[], 1).is_err());
        assert!(Split::new(&[], &[usize::MAX, 2, 2], 1).is_err());
    }

    #[test]
    fn an_empty_batch_takes_the_declared_output() {
        let split = Split::new(&[], &[0, 3], 1).unwrap();
        assert!(split.is_empty());
        let out = split
            .run_in_order(&output(), |_, _| unreachable!())
            .unwrap();
        assert_eq!(out.shape(), &[0, 2]);
        let open = TensorInfo {
            name: "y".into(),
            shape: vec![Dim::Symbolic("N".into()), Dim::Symbolic("d".into())],
        };
        let e = split.concat([], &open).unwrap_err();
        assert!(e.to_string().contains("only known at run time"), "{e}");
    }
}
