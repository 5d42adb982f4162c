"""dsset: self-supervised pretraining of 2D encoders on 3D medical scans."""
