"""Host-side data: random-access scan sources, Grain samplers and the batch pipeline."""
