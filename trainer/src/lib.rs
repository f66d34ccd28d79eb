pub mod build;
pub mod checkpoint;
pub mod export;
pub mod import;
pub mod inflate;
pub mod model;
pub mod reference;
pub mod vit;
