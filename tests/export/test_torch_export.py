"""The PyTorch export (python -m dsset.export --format=torch) and init_from=<torchvision .pth>.

Every comparison runs the JAX encoder and dsset.export.torch_resnet (torchvision's layout and
module names) in eval mode on the same normalised uint8 images, with random weights and random
BatchNorm running statistics, so BatchNorm's statistics and epsilon are part of what is compared.
"""

import json
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip('torch', reason='the PyTorch export needs torch (pip install torch)')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

import configs.base  # noqa: E402
from data_pipelines import pipeline  # noqa: E402
from dsset import checkpointing  # noqa: E402
from dsset.config_validation import ConfigError  # noqa: E402
from dsset.evaluate import features  # noqa: E402
from dsset.export import __main__ as export_main  # noqa: E402
from dsset.export import convert, to_torch, torch_resnet  # noqa: E402
from dsset.methods import contrastive, make_method  # noqa: E402
from dsset.models.layers import Layers  # noqa: E402
from dsset.models.resnet import BACKBONES  # noqa: E402
from tests import xla_env  # noqa: E402

# Pretraining steps of the slow quick-start check: the export path, not the encoder's quality.
QUICK_STEPS = 30
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (backbone, small_stem, width_multiplier, channels, image_size)
CASES = {
    'resnet18': ('resnet18', False, 1.0, 1, 64),
    'resnet10-small-stem-w0.5': ('resnet10', True, 0.5, 1, 32),
    'resnet50': ('resnet50', False, 1.0, 1, 32),
    'resnet18-rgb': ('resnet18', False, 1.0, 3, 32),
    'resnet50-rgb-small-stem': ('resnet50', True, 1.0, 3, 16),
}


def jax_model(backbone, small_stem, width, layers=Layers()):
  return BACKBONES[backbone](small_stem=small_stem, width_multiplier=width, layers=layers)


def model_config(backbone, small_stem, width):
  model = configs.base.get_config().model
  model.backbone, model.small_stem, model.width_multiplier = backbone, small_stem, width
  return model


def random_bn(tree, rng):
  """BatchNorm scale/bias and running mean/var drawn at random (conv kernels kept)."""
  draw = {'scale': lambda s: rng.uniform(0.5, 1.5, s), 'bias': lambda s: rng.normal(0, 0.2, s),
          'mean': lambda s: rng.normal(0, 0.2, s), 'var': lambda s: rng.uniform(0.5, 2.0, s)}

  def leaf(path, x):
    name = path[-1].key
    return draw[name](x.shape).astype(np.float32) if name in draw else np.asarray(x)
  return jax.tree_util.tree_map_with_path(leaf, tree)


def random_encoder(backbone, small_stem, width, channels, size, seed=0):
  # Jitted: eager initialisation compiles every op on its own (seconds per ResNet here).
  init = jax.jit(lambda key: jax_model(backbone, small_stem, width).init(
      key, jnp.zeros((1, size, size, channels)), train=False))
  variables = init(jax.random.key(seed))
  return random_bn(jax.device_get(variables), np.random.default_rng(seed))


def uint8_images(n, size, channels, seed=1):
  grey = np.random.default_rng(seed).integers(0, 256, (n, size, size, 1), dtype=np.uint8)
  return np.repeat(grey, channels, axis=3)


def jax_features(backbone, small_stem, width, variables, images, layers=Layers()):
  apply = jax.jit(lambda v, x: jax_model(backbone, small_stem, width, layers).apply(
      v, features.normalise_images(x), train=False))
  return np.asarray(apply(variables, images))


def torch_features(module, images):
  with torch.no_grad():
    return module.eval()(torch_resnet.normalise(torch.from_numpy(images.transpose(0, 3, 1, 2))))


def report(name, a, b):
  """Max abs and relative difference (printed: pytest -s shows them); asserts the 1e-4 bound."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  diff = np.abs(a - b).max()
  rel = diff / max(np.abs(b).max(), 1e-12)
  print(f'\n{name}: max |diff| {diff:.3g}, relative to max |feature| {rel:.3g} '
        f'(max |feature| {np.abs(b).max():.3g})')
  assert rel < 1e-4 and diff < 1e-4 * max(1.0, np.abs(b).max()), (diff, rel)


def pretraining_workdir(path, backbone, small_stem, width, channels, size, variables):
  """A workdir as a pretraining run leaves it: backbone.msgpack/.json and config.json."""
  os.makedirs(path, exist_ok=True)
  config = configs.base.get_config()
  config.model = model_config(backbone, small_stem, width)
  config.data.channels, config.data.image_size = channels, size
  config.data.intensity, config.data.ct_window = 'ct', (-200.0, 300.0)
  checkpointing.export_backbone(str(path), variables, (), config.model)
  with open(os.path.join(path, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort())
  return str(path)


# ResNet-50 with RGB and the small stem together: -m slow (each part has a default case).
@pytest.mark.parametrize('case', [pytest.param(c, marks=pytest.mark.slow)
                                  if c == 'resnet50-rgb-small-stem' else c for c in CASES])
def test_export_loads_strictly_and_gives_the_jax_features(tmp_path, case):
  backbone, small_stem, width, channels, size = CASES[case]
  variables = random_encoder(backbone, small_stem, width, channels, size)
  workdir = pretraining_workdir(tmp_path / 'run', backbone, small_stem, width, channels, size,
                                variables)
  out, meta_path = to_torch.export_torch(workdir, str(tmp_path / 'encoder.pt'))
  assert meta_path == str(tmp_path / 'encoder.json')

  state_dict = torch.load(out, weights_only=True)
  module = torch_resnet.ResNet(backbone, channels, small_stem, width)
  expected = module.state_dict()
  assert list(state_dict) == list(expected)
  assert {k: tuple(v.shape) for k, v in state_dict.items()} == {
      k: tuple(v.shape) for k, v in expected.items()}
  assert all(v.dtype == expected[k].dtype for k, v in state_dict.items())
  assert not any(key.startswith('fc.') for key in state_dict)
  module.load_state_dict(state_dict, strict=True)
  # BatchNorm statistics carry over as they are; epsilon and momentum are torch's defaults.
  np.testing.assert_array_equal(state_dict['bn1.running_var'].numpy(),
                                variables['batch_stats']['BatchNorm_0']['var'])
  assert module.bn1.eps == 1e-5 and module.bn1.momentum == 0.1

  images = uint8_images(6, size, channels)
  report(f'export {case}', torch_features(torch_resnet.load_encoder(out), images),
         jax_features(backbone, small_stem, width, variables, images))


def test_sidecar_records_model_torchvision_class_and_input(tmp_path):
  for name, (backbone, small_stem, width, channels, size) in (
      ('a', CASES['resnet18']), ('b', CASES['resnet10-small-stem-w0.5'])):
    variables = random_encoder(backbone, small_stem, width, channels, size)
    workdir = pretraining_workdir(tmp_path / name, backbone, small_stem, width, channels, size,
                                  variables)
    to_torch.export_torch(workdir, str(tmp_path / f'{name}.pt'))
  with open(tmp_path / 'a.json') as f:
    a = json.load(f)
  assert a['model'] == {**a['model'], 'backbone': 'resnet18', 'in_channels': 1,
                        'small_stem': False, 'width_multiplier': 1.0, 'num_features': 512}
  assert a['torchvision']['class'] == 'torchvision.models.resnet18'
  assert a['torchvision']['replace'] == {
      'conv1': 'torch.nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)'}
  norm = a['input']['normalisation']
  assert (norm['mean'], norm['std']) == (contrastive.INPUT_MEAN, contrastive.INPUT_STD)
  assert a['input']['image_size'] == 64
  intensity = a['input']['intensity']
  assert (intensity['policy'], intensity['ct_window']) == ('ct', [-200.0, 300.0])
  assert intensity['mri_percentiles'] == [0.5, 99.5]

  with open(tmp_path / 'b.json') as f:
    b = json.load(f)
  assert b['torchvision'] is None and 'resnet10' in b['torchvision_note']
  assert b['module'] == ("dsset.export.torch_resnet.ResNet('resnet10', in_channels=1, "
                         'small_stem=True, width_multiplier=0.5)')
  assert b['model']['num_features'] == 256 and 'small stem' in b['model']['stem']


def test_plain_module_matches_dsset_constants_and_architectures():
  assert (torch_resnet.INPUT_MEAN, torch_resnet.INPUT_STD) == (
      contrastive.INPUT_MEAN, contrastive.INPUT_STD)
  for name, (block, sizes) in torch_resnet.ARCHITECTURES.items():
    jax_block, jax_sizes, convs = convert.architecture(name)
    assert (block, sizes) == ('basic' if convs == 2 else 'bottleneck', jax_sizes)
  assert set(torch_resnet.ARCHITECTURES) == set(BACKBONES)


def test_plain_module_imports_without_jax():
  code = ('import sys; from dsset.export import torch_resnet; torch_resnet.resnet18(); '
          "assert not {'jax', 'flax'} & set(sys.modules), sorted(sys.modules)")
  subprocess.run([sys.executable, '-c', code], cwd=REPO, check=True)


def torch_encoder(backbone, small_stem, width, channels, seed=0):
  """A plain-module encoder with random weights and random BatchNorm statistics."""
  torch.manual_seed(seed)
  module = torch_resnet.ResNet(backbone, channels, small_stem, width)
  generator = torch.Generator().manual_seed(seed)
  for layer in module.modules():
    if isinstance(layer, torch.nn.BatchNorm2d):
      n = layer.num_features
      layer.weight.data = torch.rand(n, generator=generator) + 0.5
      layer.bias.data = torch.randn(n, generator=generator) * 0.2
      layer.running_mean = torch.randn(n, generator=generator) * 0.2
      layer.running_var = torch.rand(n, generator=generator) * 1.5 + 0.5
      layer.num_batches_tracked.fill_(1000)
  return module.eval()


def save_torchvision_file(path, module, num_classes=10):
  """A state_dict as torchvision writes it: with fc (ignored on import)."""
  state_dict = dict(module.state_dict())
  state_dict['fc.weight'] = torch.randn(num_classes, module.num_features)
  state_dict['fc.bias'] = torch.randn(num_classes)
  torch.save(state_dict, path)
  return str(path)


def jax_target(backbone, small_stem, width, channels, size):
  """This config's freshly initialised encoder variables (what init_from replaces)."""
  return jax.device_get(jax_model(backbone, small_stem, width).init(
      jax.random.key(7), jnp.zeros((1, size, size, channels)), train=False))


# ResNet-50's bottleneck mapping is checked by default in the export direction; here with -m slow.
@pytest.mark.parametrize('case', ['resnet18', 'resnet10-small-stem-w0.5',
                                  pytest.param('resnet50', marks=pytest.mark.slow)])
def test_torchvision_file_imports_exactly_and_gives_the_torch_features(tmp_path, case):
  backbone, small_stem, width, channels, size = CASES[case]
  module = torch_encoder(backbone, small_stem, width, channels)
  path = save_torchvision_file(tmp_path / 'resnet.pth', module)

  encoder, source_model = checkpointing.load_backbone(path)
  assert source_model == {'backbone': backbone, 'small_stem': small_stem,
                          'width_multiplier': width, 'source': 'torch'}
  variables = checkpointing.insert_backbone(
      jax_target(backbone, small_stem, width, channels, size), encoder, (), path)

  # Import then export gives the torchvision state_dict back exactly (fc aside).
  exported = convert.flax_to_torch(variables, backbone)
  original = module.state_dict()
  assert list(exported) == list(original)
  for key, value in original.items():
    if not key.endswith('num_batches_tracked'):
      np.testing.assert_array_equal(exported[key], value.numpy(), err_msg=key)

  images = uint8_images(6, size, channels)
  report(f'import {case}', jax_features(backbone, small_stem, width, variables, images),
         torch_features(module, images))


def test_rgb_stem_is_summed_for_grey_data(tmp_path):
  """A 3-channel torchvision stem imported into a 1-channel encoder: the three kernels are summed,
  so the JAX encoder on a grey slice equals the torch network on that slice repeated to RGB."""
  module = torch_encoder('resnet18', False, 1.0, 3)
  path = save_torchvision_file(tmp_path / 'imagenet_like.pth', module)
  encoder, _ = checkpointing.load_backbone(path)
  variables = checkpointing.insert_backbone(jax_target('resnet18', False, 1.0, 1, 32), encoder,
                                            (), path)
  kernel = variables['params']['Conv_0']['kernel']
  assert kernel.shape == (7, 7, 1, 64)
  np.testing.assert_allclose(
      kernel[:, :, 0, :], module.conv1.weight.detach().numpy().sum(axis=1).transpose(1, 2, 0),
      rtol=1e-6, atol=1e-7)

  grey = uint8_images(6, 32, 1)
  report('import rgb stem summed, grey vs repeated grey',
         jax_features('resnet18', False, 1.0, variables, grey),
         torch_features(module, np.repeat(grey, 3, axis=3)))


def test_init_from_pth_through_the_method_and_the_feature_extractor(tmp_path):
  module = torch_encoder('resnet10', True, 0.5, 3)
  path = save_torchvision_file(tmp_path / 'weights.pth', module)

  # Pretraining/fine-tuning: Method.load_init_from puts it at the method's encoder path.
  config = configs.base.get_config('tiny')
  config.method = 'simclr'
  config.model = model_config('resnet10', True, 0.5)
  config.init_from = path
  target = jax_target('resnet10', True, 0.5, 1, 32)
  variables = {'params': {'backbone': target['params'], 'head': {'w': np.zeros(2)}},
               'batch_stats': {'backbone': target['batch_stats']}}
  loaded = make_method(config).load_init_from(variables)
  assert loaded['params']['head'] is variables['params']['head']
  assert loaded['params']['backbone']['Conv_0']['kernel'].shape == (3, 3, 1, 32)

  config.model.backbone = 'resnet18'
  with pytest.raises(ConfigError, match="holds a resnet10 encoder but model.backbone='resnet18'"):
    make_method(config).load_init_from(variables)

  # Downstream runs: the architecture comes from the file, the rest of the model from the config.
  config = configs.base.get_config('tiny')  # resnet10 at width 0.125: overridden by the file
  config.init_from = path
  model = features.encoder_model_config(config)
  assert (model.backbone, model.small_stem, model.width_multiplier) == ('resnet10', True, 0.5)
  assert model.pooling == config.model.pooling
  assert features.pretraining_method(path) == 'torch weights (weights.pth)'
  config.evaluate.recompute_batch_stats = 'never'  # the file's running statistics, as torch's
  extractor = features.FeatureExtractor(config)  # data.channels = 1, CPU fast path on
  grey = uint8_images(5, 32, 1)
  report('FeatureExtractor from .pth', extractor(grey),
         torch_features(module, np.repeat(grey, 3, axis=3)))

  config.evaluate.scan_features = 'set_encoder'
  with pytest.raises(ConfigError, match='holds no set encoder'):
    features.FeatureExtractor(config)


def test_mismatches_are_named_by_torch_key(tmp_path):
  path = save_torchvision_file(tmp_path / 'r18.pth', torch_encoder('resnet18', False, 1.0, 1))
  encoder, _ = checkpointing.load_backbone(path)
  with pytest.raises(ConfigError) as error:
    checkpointing.insert_backbone(jax_target('resnet18', True, 0.5, 1, 32), encoder, (), path)
  message = str(error.value)
  assert message.split('data.channels): ')[1].startswith(
      'conv1.weight has [64, 1, 7, 7], this model [32, 1, 3, 3]; '
      'bn1.weight has [64], this model [32]')
  assert message.endswith('more')
  # A 1-channel file into a 3-channel model is not adapted.
  with pytest.raises(ConfigError, match=r'conv1.weight has \[64, 1, 7, 7\], this model '
                                        r'\[64, 3, 7, 7\]'):
    checkpointing.insert_backbone(jax_target('resnet18', False, 1.0, 3, 32), encoder, (), path)


def test_unsupported_and_broken_torch_files_fail_clearly(tmp_path):
  resnet34 = torch_resnet.ResNet('resnet18').state_dict()
  for stage, blocks in ((1, 3), (2, 4), (3, 6), (4, 3)):  # BasicBlock 3,4,6,3 = resnet34's layout
    for block in range(2, blocks):
      for key, value in torch_resnet.ResNet('resnet18').state_dict().items():
        if key.startswith(f'layer{stage}.1.'):
          resnet34[key.replace(f'layer{stage}.1.', f'layer{stage}.{block}.')] = value
  torch.save(resnet34, tmp_path / 'r34.pth')
  with pytest.raises(ConfigError, match=r'BasicBlock blocks per stage \(3, 4, 6, 3\) '
                                        r'\(resnet34\) are not a dsset backbone'):
    checkpointing.load_backbone(str(tmp_path / 'r34.pth'))

  state_dict = torch_resnet.ResNet('resnet18').state_dict()
  del state_dict['layer2.0.downsample.1.running_var']
  state_dict['layer5.0.conv1.weight'] = torch.zeros(1)
  torch.save(state_dict, tmp_path / 'broken.pth')
  with pytest.raises(ConfigError, match='missing layer2.0.downsample.1.running_var'):
    checkpointing.load_backbone(str(tmp_path / 'broken.pth'))

  # Wrapped ({'state_dict': ...}) and DataParallel ('module.') files are read.
  wrapped = {'state_dict': {f'module.{k}': v for k, v in
                            torch_resnet.ResNet('resnet10').state_dict().items()}, 'epoch': 3}
  torch.save(wrapped, tmp_path / 'wrapped.pt')
  assert checkpointing.load_backbone(str(tmp_path / 'wrapped.pt'))[1]['backbone'] == 'resnet10'

  with open(tmp_path / 'junk.pth', 'wb') as f:
    f.write(b'not a torch file')
  with pytest.raises(ConfigError, match='torch.load cannot read it'):
    checkpointing.load_backbone(str(tmp_path / 'junk.pth'))
  with pytest.raises(ConfigError, match='no such file'):
    checkpointing.load_backbone(str(tmp_path / 'absent.pth'))


def test_without_torch_both_directions_name_pip_install_torch(tmp_path, monkeypatch):
  variables = random_encoder('resnet10', True, 0.5, 1, 32)
  workdir = pretraining_workdir(tmp_path / 'run', 'resnet10', True, 0.5, 1, 32, variables)
  path = save_torchvision_file(tmp_path / 'w.pth', torch_encoder('resnet10', True, 0.5, 1))
  monkeypatch.setitem(sys.modules, 'torch', None)  # import torch raises ImportError
  with pytest.raises(ConfigError, match='needs PyTorch: pip install torch'):
    to_torch.export_torch(workdir, str(tmp_path / 'encoder.pt'))
  with pytest.raises(ConfigError, match='needs torch: pip install torch'):
    checkpointing.load_backbone(path)
  assert not os.path.exists(tmp_path / 'encoder.pt')


def test_cli_exports_and_fails_in_one_line(tmp_path, capsys):
  variables = random_encoder('resnet10', True, 0.5, 1, 32)
  workdir = pretraining_workdir(tmp_path / 'run', 'resnet10', True, 0.5, 1, 32, variables)
  out = tmp_path / 'out' / 'encoder.pt'
  assert export_main.main([f'--workdir={workdir}', '--format=torch', f'--out={out}']) == 0
  assert os.path.isfile(out) and os.path.isfile(tmp_path / 'out' / 'encoder.json')

  for args, expected in (
      ([f'--workdir={tmp_path / "missing"}'], 'no such folder'),
      ([f'--workdir={tmp_path}'], 'no backbone.msgpack + backbone.json there'),
      ([f'--workdir={workdir}', f'--out={tmp_path / "e.json"}'], 'overwritten by its .json'),
  ):
    argv = ['--format=torch', f'--out={tmp_path / "x.pt"}', *args]
    assert export_main.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith('dsset: error: ') and expected in err and err.count('\n') == 1, err


def test_cli_runs_as_a_module(tmp_path):
  proc = subprocess.run([sys.executable, '-m', 'dsset.export', f'--workdir={tmp_path}',
                         '--format=torch', f'--out={tmp_path / "e.pt"}'],
                        cwd=REPO, capture_output=True, text=True, check=False)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines() == [
      f'dsset: error: --workdir={str(tmp_path)!r}: no backbone.msgpack + backbone.json there '
      '(a pretraining run writes them when it finishes)']
  proc = subprocess.run([sys.executable, '-m', 'dsset.export', '--workdir=w', '--format=onnx',
                         '--out=e.pt'], cwd=REPO, capture_output=True, text=True, check=False)
  assert proc.returncode == 2 and "invalid choice: 'onnx'" in proc.stderr


TORCHVISION_CASES = [case for case in CASES if CASES[case][2] == 1.0
                     and CASES[case][0] in to_torch.TORCHVISION_BACKBONES]


def torchvision_from_sidecar(torchvision, meta_path):
  """torchvision's class with the replacements encoder.json prescribes, applied as written."""
  with open(meta_path) as f:
    recipe = json.load(f)['torchvision']
  model = eval(recipe['class'])(num_classes=4)  # noqa: S307 -- our own sidecar's recipe
  for name, module in recipe['replace'].items():
    setattr(model, name, eval(module))  # noqa: S307
  return model


@pytest.mark.slow
@pytest.mark.parametrize('case', TORCHVISION_CASES)
def test_export_loads_into_torchvision_itself(tmp_path, case):
  """Run by hand where torchvision imports (pytest -m slow): the sidecar's recipe, as written."""
  torchvision = pytest.importorskip('torchvision')
  backbone, small_stem, width, channels, size = CASES[case]
  variables = random_encoder(backbone, small_stem, width, channels, size)
  workdir = pretraining_workdir(tmp_path / 'run', backbone, small_stem, width, channels, size,
                                variables)
  out, meta_path = to_torch.export_torch(workdir, str(tmp_path / 'encoder.pt'))
  model = torchvision_from_sidecar(torchvision, meta_path)
  missing, unexpected = model.load_state_dict(torch.load(out, weights_only=True), strict=False)
  assert (sorted(missing), unexpected) == (['fc.bias', 'fc.weight'], [])
  model.fc = torch.nn.Identity()
  images = uint8_images(6, size, channels)
  report(f'torchvision {case}', torch_features(model, images),
         jax_features(backbone, small_stem, width, variables, images))


@pytest.mark.slow
def test_quick_start_export_in_torchvision_gives_dsset_embed_features(tmp_path):
  """The README's path on the phantom, shortened to QUICK_STEPS steps: pretrain with the quick
  start's config, export, load into torchvision by the sidecar's recipe; its features of the test
  split's slices equal those dsset.embed wrote for the same slices."""
  torchvision = pytest.importorskip('torchvision')
  workdir, out = tmp_path / 'deepset', tmp_path / 'encoder.pt'
  env = dict(os.environ, XLA_FLAGS=xla_env.ONE_DEVICE)
  run = lambda *args: subprocess.run([sys.executable, '-m', *args], cwd=REPO, env=env, check=True)
  run('dsset.main', '--config=configs/deepset.py', f'--workdir={workdir}',
      f'--config.train.num_steps={QUICK_STEPS}')
  run('dsset.export', f'--workdir={workdir}', '--format=torch', f'--out={out}')
  run('dsset.embed', f'--workdir={workdir}', f'--out={tmp_path / "emb.npz"}')
  embedded = np.load(tmp_path / 'emb.npz')
  test = embedded['slice_splits'] == 'test'

  model = torchvision_from_sidecar(torchvision, str(out).replace('.pt', '.json'))
  model.load_state_dict(torch.load(out, weights_only=True), strict=False)
  model.fc = torch.nn.Identity()
  config = configs.base.get_config()  # dsset.embed's default data section
  slices = np.concatenate([scan['slices'] for scan in
                           pipeline.make_eval_dataset(config, 'test', 'scan')])
  assert len(slices) == int(test.sum()) > 0
  report('quick start in torchvision vs dsset.embed', torch_features(model, slices),
         embedded['slice_features'][test])


