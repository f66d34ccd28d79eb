//! The burn model behind infl8-core's `Model` trait, so validation runs the
//! runtime's own slab / sliding-window inference (padding, blending,
//! inverse preprocessing) rather than a second implementation of it.

use std::sync::Mutex;

use burn::tensor::{Device, Tensor, TensorData};
use infl8_backend::{BackendError, Dim, Model, Tensor as CoreTensor, TensorInfo};

use crate::model::SegModel;

pub struct BurnModel {
    // burn modules are Send but their lazily initialised parameters are not
    // Sync; the runtime calls one batch at a time anyway.
    model: Mutex<SegModel>,
    device: Device,
    input: TensorInfo,
    output: TensorInfo,
}

/// The I/O of a model taking items of shape `item` in batches of any size.
pub(crate) fn info(name: &str, item: Vec<usize>) -> TensorInfo {
    let mut shape = vec![Dim::Symbolic("N".into())];
    shape.extend(item.into_iter().map(Dim::Fixed));
    TensorInfo {
        name: name.into(),
        shape,
    }
}

impl BurnModel {
    pub fn new(model: SegModel, device: Device) -> BurnModel {
        let input = info("image", model.config.input_item_shape());
        let output = info("logits", model.config.output_item_shape());
        BurnModel {
            model: Mutex::new(model),
            device,
            input,
            output,
        }
    }

    pub fn into_inner(self) -> SegModel {
        match self.model.into_inner() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        }
    }
}

impl Model for BurnModel {
    fn input(&self) -> &TensorInfo {
        &self.input
    }

    fn output(&self) -> &TensorInfo {
        &self.output
    }

    fn run(&self, data: &[f32], shape: &[usize]) -> Result<CoreTensor, BackendError> {
        if !self.input.accepts(shape) {
            return Err(BackendError::Shape {
                got: shape.to_vec(),
                expected: self.input.to_string(),
            });
        }
        let dims: [usize; 5] = shape
            .try_into()
            .map_err(|_| BackendError::Run("rank-5 input expected".into()))?;
        let x = Tensor::<5>::from_data(TensorData::new(data.to_vec(), dims), &self.device);
        let model = self
            .model
            .lock()
            .map_err(|_| BackendError::Run("the model lock is poisoned".into()))?;
        let y = model.forward(x);
        let out_shape = y.dims().to_vec();
        let values = y
            .into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .map_err(|e| BackendError::Run(format!("{e:?}")))?;
        CoreTensor::from_vec(out_shape, values)
    }
}
