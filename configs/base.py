"""Every default of dsset in one place, and the variants every config file accepts.

Each config file (pretraining: simclr.py, perscan.py, deepset.py; downstream: linear_eval.py,
knn_eval.py, finetune.py, segment.py) starts from get_config(variant) and overrides a few keys; the
variant is the text after the colon of --config=configs/<file>.py:<variant>:
  (none)    defaults for a few-minute run on a laptop CPU.
  paper     DS-SimCLR's reference settings (ResNet-50, 128 px, ...; paper_settings below).
  compare   the methods comparison's settings (docs/reproducing.md; compare_settings): today the
            quick start's, chosen on val, written out.
  tiny      a tiny model on tiny phantom scans for a few steps: what the tests and smoke runs use.
Key names under data/model/train/checkpoint are a stable contract (docs/architecture.md): tools and
launch scripts rely on them. Every key is checked at start-up by dsset.config_validation.
"""

import ml_collections


VARIANTS = ('paper', 'compare', 'tiny')


def get_config(arg=None):
  """The defaults, with the variant `arg` applied (None or '' for none)."""
  if arg not in (None, '', *VARIANTS):
    raise ValueError(f'unknown config variant {arg!r}; known variants: {", ".join(VARIANTS)} '
                     '(e.g. --config=configs/deepset.py:paper)')
  c = ml_collections.ConfigDict()

  # What runs (dsset.methods.METHODS): pretraining 'simclr' | 'perscan' | 'deepset' (which views are
  # contrasted), or a downstream evaluation of an encoder 'linear' | 'knn' | 'finetune' | 'segment'.
  c.method = 'deepset'
  c.seed = 0
  # A pretraining workdir whose encoder initialises this run (downstream configs); '' = random init.
  c.init_from = ''

  c.data = ml_collections.ConfigDict()
  # 'phantom' (generated, offline) | 'nifti' | 'dicom' | 'png' | 'npz' | 'datalist' | 'tfds'.
  c.data.source = 'phantom'
  c.data.path = ''
  # The defaults are the README's quick start (about 8 minutes on a 2-core CPU), chosen on the
  # validation split (docs/reproducing.md, "Quick start"): 32 px, ResNet-10 at width 0.5, T = 0.1,
  # 2400 steps. For real scans use a variant (:paper) or larger data.image_size and backbone.
  c.data.image_size = 32
  c.data.channels = 1  # 1 = grey scans as they are; 3 = grey repeated to RGB (reference code).
  c.data.set_size = 3  # K: slices per set (DS-SimCLR). simclr/perscan use 1.
  c.data.window = 0.5  # omega: window width as a fraction of the scan's slices.
  # A DS-SimCLR set from a scan with fewer than K slices: 'repeat' (the reference code: K indices
  # rounded down from linspace over the window, some repeated) | 'pad' (min(n, K) slices, the rest
  # of the set padded and masked out).
  c.data.short_scans = 'repeat'
  # Every source leaves out scans with fewer slices, whatever the method; set it to K to leave out
  # the scans too short for a set for SimCLR and PS-SimCLR as well (the same scans for every method).
  c.data.min_slices = 1
  c.data.slice_axis = 'axial'  # 'axial' | 'coronal' | 'sagittal' (after RAS reorientation).
  # Intensity policy: 'auto' (chosen per source from a few scans: 'ct' when HU-like, else 'mri',
  # or 'minmax' for PNG/.npz; docs/data.md) | 'ct' (HU window -> [0, 1]) | 'mri' (percentile
  # clip -> [0, 1]) | 'minmax'.
  c.data.intensity = 'auto'
  c.data.ct_window = (-1000.0, 1000.0)  # HU (low, high) mapped to [0, 1].
  c.data.mri_percentiles = (0.5, 99.5)
  c.data.labels_csv = ''  # CSV of name,label rows (integers or class names; docs/data-formats.md).
  c.data.masks_path = ''  # folder of voxel masks parallel to data.path.
  c.data.cache_dir = ''  # decoded-volume cache ('' = <data.path>/.dsset_cache or a temp folder).
  c.data.cache_max_gb = 20.0
  c.data.on_bad_scan = 'skip'  # 'skip' (warn, summarise) | 'stop'.
  # Scans whose header declares more voxels than this are refused before anything is allocated
  # (damaged or hostile headers can declare terabytes); 2**31 is about 8 GB as float32.
  c.data.max_voxels = 2**31
  c.data.num_workers = 0  # Grain worker processes; 0 = in the main process.
  c.data.prefetch_buffer = 2
  c.data.read_threads = 2  # threads per process computing examples (Grain ReadOptions).
  # Decoded DICOM/PNG scans kept in memory per process (LRU), so samplers revisiting a scan skip
  # the decode; 0 = no cache.
  c.data.decoded_cache_scans = 8
  # Voxel size (slice, row, column) in mm for formats without geometry (PNG folders, .npz).
  c.data.default_spacing = (1.0, 1.0, 1.0)
  # data_pipelines.prepare resamples every scan to this (slice, row, column) spacing in mm, by
  # linear interpolation (masks: nearest); () keeps each scan's own spacing.
  c.data.target_spacing = ()
  # 3D methods (rotation3d, segment3d, linear3d): each example is a cube of volume_size voxels
  # per side, cut from the scan after resampling it to voxel_mm (isotropic, mm; 0 = keep the scan's
  # own voxels), randomly placed in training and centred in evaluation, zero-padded where the scan
  # is smaller (docs/data.md, "Volumes").
  c.data.volume_size = 32
  c.data.voxel_mm = 0.0
  c.data.val_fraction = 0.15  # split of sources without their own splits, by scan.
  c.data.test_fraction = 0.15
  c.data.phantom = ml_collections.ConfigDict()
  c.data.phantom.num_scans = 192  # 136 train, 28 val, 28 test
  # Held-out scans beyond num_scans, half to val and half to test (a multiple of 8): more evaluation
  # scans without changing the train split that pretraining used.
  c.data.phantom.extra_eval_scans = 0
  # Labelled scans added to the train split after all others (a multiple of 4). Meant for evaluation
  # runs: a linear probe on scan features gets more labels than the handful of scans pretraining
  # used, none of which the pretrained encoder saw. Pretraining with it simply trains on more scans.
  c.data.phantom.extra_train_scans = 0
  c.data.phantom.depth = 32
  c.data.phantom.height = 64
  c.data.phantom.width = 64
  c.data.phantom.seed = 0
  c.data.phantom.noise_hu = 15.0  # Gaussian noise (HU) added to every phantom voxel.
  # 'varied': patients differ in body habitus, table position and rotation, organ outlines, scan
  # length (slice thickness), scanner calibration, contrast, noise and reconstruction blur, and
  # slices average over their thickness (docs/data.md). 'uniform': the phantom of 2026-11 to
  # 2026-12-06, on which every earlier table in docs/reproducing.md was measured.
  c.data.phantom.anatomy = 'varied'
  # The varied phantom's objects (the labelled lesions): in-plane radius in mm (the sphere's middle
  # slice, the tube, the disc; the box has the same area) and contrast enhancement in HU, each drawn
  # per scan from (low, high). Chosen on val so that the quick start's 32 px slices show them (2.4-4
  # px radius); (16.0, 28.0) and (200.0, 360.0) give the varied phantom of 2026-12-06. 'uniform'
  # ignores both (16-28 mm, 280 HU).
  c.data.phantom.object_radius_mm = (24.0, 40.0)
  c.data.phantom.object_hu = (400.0, 600.0)

  # 2D pretraining, on the device (dsset.augment), SimCLR's recipe as the reference code applies it.
  c.augment = ml_collections.ConfigDict()
  # The random resized crop is cut from the slice shipped at S = max(data.image_size,
  # min(crop_source_size, the source's largest slice edge where it knows it: phantom, .npz)) pixels
  # square and then resized to data.image_size, so small crops keep detail as in the reference,
  # which crops the slice at its native size. The cap bounds host memory (a batch is
  # B x 2 x K x S^2 x channels bytes); 0 (or <= image_size) crops from the image_size slice.
  c.augment.crop_source_size = 256
  c.augment.crop_scale = (0.08, 1.0)
  c.augment.crop_ratio = (3.0 / 4.0, 4.0 / 3.0)
  c.augment.flip_prob = 0.5
  # s: brightness and contrast factors uniform in [max(0, 1 - 0.8 s), 1 + 0.8 s]; s = 1 is the
  # reference's ColorJitter(brightness=0.8, contrast=0.8), factors in [0.2, 1.8].
  c.augment.jitter_strength = 1.0
  c.augment.jitter_prob = 0.8
  c.augment.blur_prob = 0.5
  c.augment.blur_sigma = (0.1, 2.0)  # output pixels; the kernel reaches 3 x the upper bound each side.

  # 3D methods, on the device (dsset.augment3d): flips per axis, right-angle turns in each plane,
  # then intensity * scale + shift. rotation3d turns off the geometric part (its pretext is the
  # orientation); segment3d trains without augmentation unless asked, as the 2D downstream runs.
  c.augment3d = ml_collections.ConfigDict()
  c.augment3d.flip_prob = 0.5
  c.augment3d.rotate90 = True
  c.augment3d.intensity_scale = (0.9, 1.1)
  c.augment3d.intensity_shift = (-0.1, 0.1)

  c.model = ml_collections.ConfigDict()
  # 2D: 'resnet10' (quick) | 'resnet18' | 'resnet50'; 3D methods: 'unet3d' (the down path of a 3D
  # U-Net, model.unet3d below).
  c.model.backbone = 'resnet10'
  c.model.small_stem = False  # 3x3/1 stem without max-pool, for 28-64 px inputs.
  c.model.width_multiplier = 0.5
  c.model.pooling = 'sum'  # set pooling: 'sum' | 'mean'
  c.model.rho = False  # Deep Set rho MLP after pooling.
  # How the two views of a pair meet BatchNorm (contrastive and clustering methods): 'separate'
  # (the DS-SimCLR reference code: one model call per view, so each view is normalised by its own
  # batch statistics) | 'joint' (one call on both views' 2B rows; SwAV's and DeepCluster-v2's code).
  c.model.batch_norm_views = 'separate'
  c.model.head_hidden = 2048
  c.model.head_out = 128
  c.model.unet3d = ml_collections.ConfigDict()
  c.model.unet3d.filters = (16, 32, 64, 128)  # [conv3^3-BN-ReLU] x 2 per level, max-pool 2^3 between
  c.model.unet3d.bottleneck = 256  # filters of the deepest level (no pool after it)
  c.model.unet3d.dropout = 0.0  # dropout after each level's convs (0 = off)
  # The 3D proxy tasks' pretext head on the pooled bottleneck (Taleb et al.): Dense-ReLU-BN-Dropout
  # per width.
  c.model.pretext_hidden = (2048, 1024)
  c.model.pretext_dropout = 0.5
  c.model.dtype = 'auto'  # compute dtype: 'auto' (float32 on CPU, bfloat16 on GPU/TPU) | 'float32' | 'bfloat16'
  c.model.cpu_fast_path = 'auto'  # CPU-only op rewrites: 'auto' (on when the backend is CPU) | 'on' | 'off'

  c.loss = ml_collections.ConfigDict()
  c.loss.temperature = 0.1  # SimCLR paper 0.1; the reference code 0.5 (:paper).
  c.loss.same_scan_positives = False  # treat other items of the same scan in a batch as positives.

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 32  # global: scans (or slices) per step across all devices.
  c.train.num_steps = 2400
  # > 0: train this many epochs instead of train.num_steps. An epoch is one pass over the method's
  # train records: the slices of all train scans for the 2D slice methods (simclr, perscan, deepset,
  # swav, deepcluster_v2; the reference's epoch, whatever the sampler draws), the scans for the 3D
  # methods, the labelled train examples for downstream runs; ceil(records / train.batch_size) steps.
  # Converted once when the train data is read, printed, and stored as train.num_steps in config.json.
  c.train.num_epochs = 0
  c.train.optimizer = 'adam'  # 'adam' | 'sgd' | 'lars'
  c.train.learning_rate = 1e-3
  c.train.momentum = 0.9
  c.train.weight_decay = 1e-6
  c.train.warmup_steps = 30
  c.train.warmup_epochs = 0  # > 0: a warm-up of this many epochs instead of train.warmup_steps.
  c.train.schedule = 'cosine'  # 'cosine' | 'constant'
  c.train.grad_clip_norm = 0.0  # 0 = off.
  c.train.log_every_steps = 10
  c.train.on_nonfinite = 'stop'  # 'stop' | 'skip'

  c.monitor = ml_collections.ConfigDict()
  c.monitor.enabled = True  # online stop-gradient linear probe on the scan labels.
  c.monitor.learning_rate = 1e-2

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 100
  c.checkpoint.max_to_keep = 3

  # Multi-process runs (dsset.parallel.initialize_distributed; docs/scaling.md). 'auto' joins a
  # cluster when the environment shows one (DSSET_COORDINATOR_ADDRESS/DSSET_NUM_PROCESSES/
  # DSSET_PROCESS_ID, or a SLURM/Open MPI job of several tasks); 'on' always calls
  # jax.distributed.initialize (JAX detects TPU pods, SLURM and Open MPI); 'off' never does.
  c.distributed = ml_collections.ConfigDict()
  c.distributed.enabled = 'auto'  # 'auto' | 'on' | 'off'
  c.distributed.coordinator_address = ''  # host:port of process 0; '' = environment / JAX.
  c.distributed.num_processes = 0  # 0 = environment / JAX.
  c.distributed.process_id = -1  # -1 = environment / JAX.

  # Downstream evaluation of an encoder (methods 'linear', 'knn', 'finetune', 'segment'; their
  # training steps, batch, learning rate and optimiser are the train.* keys, set by their files).
  c.evaluate = ml_collections.ConfigDict()
  c.evaluate.level = 'scan'  # 'scan' (one feature per scan) | 'slice' (one per slice).
  # Scan features from slice features: 'mean' | 'set_encoder' (the pretraining run's pooling and
  # rho; DS-SimCLR's set encoder) | 'slice_transformer' (an intra_inter run's volume feature of the
  # scan's central data.num_slices slices). Frozen-feature methods only: fine-tuning pools by the
  # mean.
  c.evaluate.scan_features = 'mean'
  c.evaluate.label_fraction = 1.0  # share of the labelled train scans used (stratified, seeded).
  c.evaluate.batch_size = 64  # images per encoder call during feature extraction and prediction.
  # Frozen-feature runs (linear, knn, embed): before extracting features, set every BatchNorm's
  # running mean and variance to the exact ones of its inputs over the train split's images (all
  # its scans, labelled or not), passed through the encoder in train mode in batches of
  # evaluate.batch_size (a cumulative average over the batches, not a moving one). A random-init
  # encoder's statistics are 0 and 1 and scale its eval-mode features badly.
  # 'random_init' (only when init_from is '') | 'always' | 'never'. eval.json records the choice.
  # 'always' (the default, chosen on val): a pretrained encoder's running statistics are those of
  # augmented views; recomputed on the images it is evaluated on, it gave the pretrained encoders
  # +0.013-0.018 val accuracy, and every encoder is then treated alike.
  c.evaluate.recompute_batch_stats = 'always'
  # The linear probe's L2 grid: one probe per value, val picks one. Up to 3.0 since 2026-12-07: on
  # the phantom's val split (3 seeds) both pretrained and random-init features chose the grid's top
  # (0.1) and read the label better with 0.3-3 (docs/reproducing.md).
  c.evaluate.weight_decays = (0.0, 1e-3, 1e-2, 1e-1, 0.3, 1.0, 3.0)
  # The split every reported metric of a downstream run is computed on: 'test' (default) | 'val'
  # (while choosing settings: the test split is then never read, so it cannot leak into a choice).
  c.evaluate.report_split = 'test'
  c.evaluate.knn_k = 20
  c.evaluate.knn_temperature = 0.07  # vote weight exp(cosine / T), as in InstDisc and DINO.
  c.evaluate.segment_freeze_steps = 0  # first steps train the decoder only (encoder frozen).
  c.evaluate.segment_num_classes = 0  # mask ids 0..C-1; 0 = the largest id in train masks + 1.

  if arg == 'paper':
    paper_settings(c)
  elif arg == 'compare':
    compare_settings(c)
  elif arg == 'tiny':
    tiny_settings(c)
  return c


def downstream_training(c, arg, *, num_steps: int, batch_size: int, learning_rate: float,
                        optimizer: str = 'adam', weight_decay: float = 0.0) -> None:
  """The train.* keys of a downstream method (its head's training), for every variant.

  A constant learning rate without warm-up; no online probe (the run is the probe). The variants'
  model and data keys stay as they are: an encoder is evaluated on the data it was pretrained on.
  """
  c.train.num_steps = 3 if arg == 'tiny' else num_steps
  c.train.batch_size = batch_size
  c.train.learning_rate = learning_rate
  c.train.optimizer = optimizer
  c.train.weight_decay = weight_decay
  c.train.schedule = 'constant'
  c.train.num_epochs = 0
  c.train.warmup_steps = 0
  c.train.warmup_epochs = 0
  c.train.grad_clip_norm = 0.0
  c.train.log_every_steps = 1 if arg == 'tiny' else 10
  c.monitor.enabled = False


def scan_level_test_set(c, arg) -> None:
  """Scan-level evaluations (linear_eval.py, knn_eval.py) with their own defaults: 400 held-out
  phantom scans, 200 more for val and 200 for test (228 each with the regular ones), so that the
  README's plain evaluation command measures something (one scan is 0.4 points of accuracy, the
  binomial standard error about 3 points). Pretraining never sees them. The comparison (:compare)
  evaluates alike; :paper and :tiny keep theirs.
  """
  if arg in (None, '', 'compare'):
    c.data.phantom.extra_eval_scans = 400


def paper_settings(c) -> None:
  """DS-SimCLR's reference settings: configs/example.yaml of the authors' code
  (DavidTorpey/deepset-simclr) with the defaults its training code fills in.

  ResNet-50, 128 px, K = 3, omega = 0.5, rho on (the yaml's dedicated_deepset_mlp; deepset.py sets
  it, the reference's SimCLR model has none), batch 32, each view through the model on its own
  (per-view BatchNorm statistics), NT-Xent at temperature 0.5 (lightly's NTXentLoss default), Adam
  with L2 weight decay 1e-10, 100 epochs: a linear warm-up from 0 over 1 epoch (the code's default
  warmup_epochs), then cosine decay to 0, set per step. The reference's dataset has one item per
  slice file (each item draws a random scan), so its epoch is ceil(train slices / 32) steps for
  every 2D method (train.num_epochs; the reference drops the last partial batch, one step less
  when 32 does not divide the slices). The 3D configs' :paper keeps these epochs, over scans.

  Where the reference cannot be followed as written:
  - train.learning_rate 1e-3, not the yaml's 0.07 (--config.train.learning_rate=0.07 restores it).
    Adam moves every weight by about the learning rate each step whatever its gradient's scale,
    and 0.07 is as large as ResNet-50's initial weights (kaiming std sqrt(2 / fan_out), 0.02 to
    0.18), so the first steps would erase the initialisation: 0.07 reads as a value carried over
    from an SGD/LARS recipe. 1e-3 is Adam's usual rate and this project's default (the reference
    code's own default, used when a yaml sets none, is 3e-4).
  - data.channels 1: the reference repeats grey slices to RGB and uses ImageNet's normalisation;
    data.channels=3 repeats them (the normalisation stays this project's).
  - The weight decay skips biases and BatchNorm parameters (torch's Adam decays all); at 1e-10
    neither changes anything.
  """
  c.model.backbone = 'resnet50'
  c.model.width_multiplier = 1.0
  c.model.batch_norm_views = 'separate'
  c.data.image_size = 128
  c.data.set_size = 3
  c.data.window = 0.5
  c.train.batch_size = 32
  c.train.optimizer = 'adam'
  c.train.learning_rate = 1e-3
  c.train.weight_decay = 1e-10
  c.train.schedule = 'cosine'
  c.train.num_epochs = 100
  c.train.warmup_epochs = 1
  c.loss.temperature = 0.5


def compare_settings(c) -> None:
  """The methods comparison (scripts/compare_methods.sh, docs/reproducing.md): the quick start's
  settings, written out so that the comparison stays put when a default moves.

  Every value was chosen on the validation split, never on test (docs/reproducing.md, "Quick start":
  DS-SimCLR against random init, seed 0, val accuracy of the scan-level probe): 32 px slices, where
  a step costs a third of 64 px's so that 2400 steps fit about 8 minutes here; ResNet-10 at width
  0.5; temperature 0.1 (SimCLR's paper; the reference code's 0.5 is :paper's); BatchNorm statistics
  recomputed on the train images before every probe. The probe's weight decay is picked on val by
  the probe itself (evaluate.weight_decays), and the probe sees the 136 train scans' labels only:
  the earlier comparison's 1024 extra labelled scans were chosen on test results and are gone.
  Evaluation adds 400 held-out scans (scan_level_test_set: 228 val, 228 test). The phantom's objects
  (24-40 mm, 400-600 HU) were chosen on the val split of 3 seeds (DS-SimCLR against random init).
  """
  c.model.backbone = 'resnet10'
  c.model.width_multiplier = 0.5
  c.data.image_size = 32
  c.data.phantom.num_scans = 192
  c.data.phantom.anatomy = 'varied'
  c.data.phantom.object_radius_mm = (24.0, 40.0)
  c.data.phantom.object_hu = (400.0, 600.0)
  c.train.num_steps = 2400
  c.train.batch_size = 32
  c.train.warmup_steps = 30
  c.loss.temperature = 0.1
  c.evaluate.recompute_batch_stats = 'always'
  c.evaluate.weight_decays = (0.0, 1e-3, 1e-2, 1e-1, 0.3, 1.0, 3.0)


def tiny_settings(c) -> None:
  """Seconds per run on two CPU cores: what tests and smoke runs use (not for results)."""
  c.data.image_size = 32
  c.data.phantom.num_scans = 16
  c.data.phantom.depth = 12
  c.data.phantom.height = 32
  c.data.phantom.width = 32
  c.model.backbone = 'resnet10'
  c.model.width_multiplier = 0.125
  c.model.head_hidden = 32
  c.model.head_out = 16
  c.train.batch_size = 8
  c.train.num_steps = 3
  c.train.warmup_steps = 1
  c.train.log_every_steps = 1
  c.evaluate.batch_size = 32


def tiny_3d_settings(c) -> None:
  """tiny_settings for the 3D methods: a two-level encoder on 16^3 cubes (tests, smoke runs)."""
  c.data.volume_size = 16
  c.model.unet3d.filters = (4, 8)
  c.model.unet3d.bottleneck = 16
  c.model.pretext_hidden = (32, 16)
  c.train.batch_size = 8
  c.evaluate.batch_size = 4


def vissl_paper_settings(c) -> None:
  """The VISSL settings of the clustering methods' :paper variants (swav.py, deepcluster_v2.py):
  224 px views, batch 256, LARS at 0.3 (0.3 per 256 examples), weight decay 1e-6, 1000 steps with
  100 warm-up."""
  c.data.image_size = 224
  c.train.batch_size = 256
  c.train.optimizer = 'lars'
  c.train.learning_rate = 0.3
  c.train.weight_decay = 1e-6
  c.train.num_epochs = 0  # steps, not paper_settings' epochs
  c.train.num_steps = 1000
  c.train.warmup_epochs = 0
  c.train.warmup_steps = 100
