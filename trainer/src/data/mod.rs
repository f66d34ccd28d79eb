//! Case discovery for training and quantization: labelled datasets (MSD
//! or `<id>_image` / `<id>_label` pairs) and the quantizer's calibration
//! paths, which accept those datasets or plain folders of NIfTI files.

pub mod calib;
pub mod dataset;

pub use dataset::{
    Case, Dataset, DatasetError, MsdDataset, PairsDataset, PreparedCase, StoredCase, open_dataset,
    prepare, split,
};
