"""The 3D U-Net encoder's PyTorch export (MONAI BasicUNet's layout) and init_from=<3D .pth>.

As for the ResNets (test_torch_export.py), the JAX encoder and dsset.export.torch_unet3d run in
eval mode on the same normalised uint8 volumes, with random weights and random BatchNorm running
statistics. Where MONAI is installed, its BasicUNet itself takes the export (its encoder path is
run level by level and compared); without it those tests skip.
"""

import json

import pytest

torch = pytest.importorskip('torch', reason='the PyTorch export needs torch (pip install torch)')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import configs.base  # noqa: E402
from configs import rotation3d, segment3d  # noqa: E402
from dsset import augment3d, checkpointing  # noqa: E402
from dsset.config_validation import ConfigError  # noqa: E402
from dsset.export import __main__ as export_main  # noqa: E402
from dsset.export import convert, torch_unet3d  # noqa: E402
from dsset.methods import make_method  # noqa: E402
from dsset.models import unet3d  # noqa: E402
from tests.export.test_torch_export import random_bn, report  # noqa: E402

# MONAI's BasicUNet has exactly 4 pooled levels: small widths keep the test fast.
FILTERS, BOTTLENECK, SIZE = (2, 4, 4, 8), 8, 16


def jax_encoder(filters=FILTERS, bottleneck=BOTTLENECK):
  return unet3d.UNet3DEncoder(tuple(filters), bottleneck)


def random_encoder(filters=FILTERS, bottleneck=BOTTLENECK, seed=0):
  # Jitted: eager initialisation compiles every 3D op on its own (tens of seconds here).
  init = jax.jit(lambda key: jax_encoder(filters, bottleneck).init(
      key, jnp.zeros((1, SIZE, SIZE, SIZE, 1)), train=False))
  variables = init(jax.random.key(seed))
  return random_bn(jax.device_get(variables), np.random.default_rng(seed))


def uint8_volumes(n=3, seed=1):
  return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, SIZE, 1), dtype=np.uint8)


def jax_outputs(variables, volumes, filters=FILTERS, bottleneck=BOTTLENECK):
  """(pooled features, bottleneck map, skips) of the JAX encoder in eval mode, channels first."""
  encoder = jax_encoder(filters, bottleneck)
  # One jitted program (eager 3D ops would each compile on their own).
  bottleneck_map, skips = jax.jit(lambda v, x: encoder.apply(
      v, augment3d.normalise(x), train=False, skips=True))(variables, volumes)
  first = lambda a: np.asarray(a).transpose(0, 4, 1, 2, 3)
  pooled = np.asarray(bottleneck_map, np.float32).mean(axis=(1, 2, 3))
  return pooled, first(bottleneck_map), [first(s) for s in skips]


def torch_input(volumes):
  return torch_unet3d.normalise(torch.from_numpy(volumes.transpose(0, 4, 1, 2, 3)))


def to_torch_state_dict(variables):
  return {k: torch.from_numpy(np.array(v)) for k, v in
          convert.flax_to_torch(variables, unet3d.BACKBONE).items()}


def test_export_loads_strictly_into_the_plain_module_with_the_same_maps_and_features():
  variables = random_encoder()
  state_dict = to_torch_state_dict(variables)
  module = torch_unet3d.UNet3DEncoder(1, FILTERS, BOTTLENECK)
  assert list(state_dict) == list(module.state_dict())
  assert {k: tuple(v.shape) for k, v in state_dict.items()} == {
      k: tuple(v.shape) for k, v in module.state_dict().items()}
  module.load_state_dict(state_dict, strict=True)
  module.eval()
  assert state_dict['conv_0.conv_0.conv.weight'].shape == (2, 1, 3, 3, 3)  # OIDHW
  np.testing.assert_array_equal(state_dict['down_4.convs.conv_1.adn.N.running_var'].numpy(),
                                variables['batch_stats']['ConvBlock3D_4']['BatchNorm_1']['var'])
  assert module.down_1.convs.conv_0.adn.N.eps == 1e-5

  volumes = uint8_volumes()
  pooled, bottleneck_map, skips = jax_outputs(variables, volumes)
  with torch.no_grad():
    torch_map, torch_skips = module.features_and_skips(torch_input(volumes))
    torch_pooled = module(torch_input(volumes))
  report('unet3d pooled features', torch_pooled, pooled)
  report('unet3d bottleneck map', torch_map, bottleneck_map)
  for level, (a, b) in enumerate(zip(torch_skips, skips)):
    report(f'unet3d skip {level}', a, b)


def test_import_then_export_round_trips_a_state_dict_exactly():
  module = torch_unet3d.UNet3DEncoder(1, (3, 5), 7)
  generator = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for name, buffer in module.named_buffers():
      if name.endswith(('running_mean', 'running_var')):
        buffer.copy_(torch.rand(buffer.shape, generator=generator) + 0.5)
  original = {k: v.numpy() for k, v in module.state_dict().items()}
  assert convert.infer_model(original) == {'backbone': 'unet3d', 'filters': [3, 5],
                                           'bottleneck': 7, 'in_channels': 1}
  encoder = convert.torch_to_flax(original, unet3d.BACKBONE)
  back = convert.flax_to_torch(encoder, unet3d.BACKBONE)
  assert list(back) == list(original)
  for key, value in original.items():
    assert back[key].dtype == value.dtype and back[key].shape == value.shape, key
    np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_cli_exports_a_3d_run_with_its_sidecar(tmp_path):
  variables = random_encoder()
  config = segment3d.get_config('tiny')
  config.model.unet3d.filters, config.model.unet3d.bottleneck = FILTERS, BOTTLENECK
  config.data.volume_size, config.data.voxel_mm = SIZE, 1.5
  workdir = tmp_path / 'run'
  workdir.mkdir()
  checkpointing.export_backbone(str(workdir), variables, (), config.model)
  (workdir / 'config.json').write_text(config.to_json_best_effort())
  out = tmp_path / 'encoder.pt'
  assert export_main.main(['--workdir', str(workdir), '--format', 'torch', '--out',
                           str(out)]) == 0

  meta = json.loads((tmp_path / 'encoder.json').read_text())
  assert meta['model']['backbone'] == 'unet3d'
  assert (meta['model']['filters'], meta['model']['bottleneck']) == (list(FILTERS), BOTTLENECK)
  assert meta['input']['voxel_mm'] == 1.5 and meta['input']['volume_size'] == SIZE
  assert meta['input']['normalisation']['mean'] == augment3d.INPUT_MEAN
  assert meta['monai']['class'] == 'monai.networks.nets.BasicUNet'
  assert 'features=(2, 4, 4, 8, 8, 2)' in meta['monai']['construct']
  volumes = uint8_volumes()
  with torch.no_grad():
    exported = torch_unet3d.load_encoder(str(out))(torch_input(volumes))
  report('unet3d CLI export', exported, jax_outputs(variables, volumes)[0])


def test_sidecar_says_when_monai_has_no_matching_depth(tmp_path):
  variables = random_encoder((2, 4), 4)
  model = configs.base.get_config().model
  model.backbone, model.unet3d.filters, model.unet3d.bottleneck = 'unet3d', (2, 4), 4
  checkpointing.export_backbone(str(tmp_path), variables, (), model)
  export_main.main(['--workdir', str(tmp_path), '--format', 'torch', '--out',
                    str(tmp_path / 'e.pt')])
  meta = json.loads((tmp_path / 'e.json').read_text())
  assert meta['monai'] is None and '4 pooled levels' in meta['monai_note']
  assert meta['input']['note'].startswith('no config.json')


def rotation3d_method(filters=FILTERS, bottleneck=BOTTLENECK, init_from=''):
  """A 3D method whose model is built without reading data (segment3d's needs the classes)."""
  config = rotation3d.get_config('tiny')
  config.model.unet3d.filters, config.model.unet3d.bottleneck = filters, bottleneck
  config.data.volume_size = SIZE
  config.init_from = init_from
  method = make_method(config)
  return method, jax.device_get(jax.jit(method.init)(jax.random.key(0)))


def test_init_from_a_3d_pth_puts_the_encoder_in_exactly(tmp_path):
  variables = random_encoder()
  path = tmp_path / 'encoder.pth'
  torch.save(to_torch_state_dict(variables), path)
  method, fresh = rotation3d_method(init_from=str(path))
  loaded = method.load_init_from(fresh)
  for collection in ('params', 'batch_stats'):
    got = checkpointing.subtree(loaded[collection], unet3d.ENCODER_PATH)
    jax.tree.map(np.testing.assert_array_equal, got, variables[collection])
  # The rest of the model is the fresh one.
  jax.tree.map(np.testing.assert_array_equal, loaded['params']['pretext_head'],
               fresh['params']['pretext_head'])


def test_init_from_a_3d_pth_of_other_widths_names_the_torch_keys(tmp_path):
  path = tmp_path / 'wide.pth'
  torch.save(to_torch_state_dict(random_encoder((2, 4, 4, 16), 8)), path)
  method, fresh = rotation3d_method(init_from=str(path))
  with pytest.raises(ConfigError) as error:
    method.load_init_from(fresh)
  # OIDHW, as torch holds it: [out, in, 3, 3, 3].
  assert ('down_3.convs.conv_0.conv.weight has [16, 4, 3, 3, 3], this model [8, 4, 3, 3, 3]'
          in str(error.value))


def test_instance_norm_state_dict_is_refused_with_the_reason():
  state_dict = {k: v for k, v in convert.flax_to_torch(random_encoder(), 'unet3d').items()
                if not k.endswith(('running_mean', 'running_var', 'num_batches_tracked'))}
  with pytest.raises(convert.ConversionError, match="norm='batch'"):
    convert.torch_to_flax(state_dict, unet3d.BACKBONE)


def monai_basic_unet(bias):
  monai_nets = pytest.importorskip('monai.networks.nets',
                                   reason='MONAI is not installed (pip install monai)')
  return monai_nets.BasicUNet(spatial_dims=3, in_channels=1, out_channels=3,
                              features=(*FILTERS, BOTTLENECK, FILTERS[0]), act='relu',
                              norm=('batch', {'eps': 1e-5, 'momentum': 0.1}), bias=bias,
                              dropout=0.0)


def monai_encoder_features(net, volumes):
  """BasicUNet's encoder path (conv_0, down_1 .. down_4), pooled as dsset pools it."""
  with torch.no_grad():
    x = net.eval().conv_0(torch_input(volumes))
    for level in range(1, 5):
      x = getattr(net, f'down_{level}')(x)
    return x.mean(dim=(2, 3, 4))


def test_export_loads_into_monai_basic_unet_with_only_the_decoder_missing():
  net = monai_basic_unet(bias=False)
  variables = random_encoder()
  missing, unexpected = net.load_state_dict(to_torch_state_dict(variables), strict=False)
  assert not unexpected
  assert missing and all(key.startswith(('upcat_', 'final_conv.')) for key in missing)
  volumes = uint8_volumes()
  report('unet3d in MONAI BasicUNet', monai_encoder_features(net, volumes),
         jax_outputs(variables, volumes)[0])


def test_monai_basic_unet_with_conv_biases_imports_with_the_biases_folded():
  net = monai_basic_unet(bias=True)
  generator = torch.Generator().manual_seed(3)
  with torch.no_grad():
    for name, tensor in net.state_dict().items():
      if name.endswith(('conv.bias', 'running_mean')):
        tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.3)
      elif name.endswith('running_var'):
        tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
  state_dict = {k: v.numpy() for k, v in net.state_dict().items()}
  assert convert.infer_model(state_dict)['filters'] == list(FILTERS)
  encoder = convert.torch_to_flax(state_dict, unet3d.BACKBONE)
  volumes = uint8_volumes()
  report('MONAI BasicUNet (conv bias) imported', jax_outputs(encoder, volumes)[0],
         monai_encoder_features(net, volumes))
