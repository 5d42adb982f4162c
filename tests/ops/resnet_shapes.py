"""Conv and max-pool shapes of torchvision-layout ResNet-18/50 (7x7/2 stem + max-pool)."""

RESOLUTIONS = (32, 64, 128)


def _after_3x3(size: int, stride: int) -> int:
  # 3x3 window, padding 1.
  return (size + 2 - 3) // stride + 1


def stem_pool_input(image_size: int) -> int:
  """Side of the stem's output map, which the 3x3/2 max-pool reads."""
  return (image_size + 6 - 7) // 2 + 1


def conv3x3_shapes(backbone: str, image_size: int) -> set[tuple[int, int, int, int]]:
  """Every 3x3 conv of the residual stages as (input side, in channels, out channels, stride)."""
  size = _after_3x3(stem_pool_input(image_size), 2)
  shapes = set()
  if backbone == 'resnet18':
    channels = 64
    for stage, width in enumerate((64, 128, 256, 512)):
      stride = 1 if stage == 0 else 2
      for block in range(2):
        s = stride if block == 0 else 1
        shapes.add((size, channels, width, s))
        size = _after_3x3(size, s)
        shapes.add((size, width, width, 1))
        channels = width
  elif backbone == 'resnet50':
    # Bottleneck v1.5: the stride sits on the 3x3 conv, between two 1x1 convs.
    for stage, (width, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3))):
      stride = 1 if stage == 0 else 2
      for block in range(blocks):
        s = stride if block == 0 else 1
        shapes.add((size, width, width, s))
        size = _after_3x3(size, s)
  else:
    raise ValueError(backbone)
  return shapes


def batch_norm_shapes(backbone: str, image_size: int) -> set[tuple[int, int]]:
  """Every BatchNorm input of the network as (map side, channels), stem included."""
  shapes = {(stem_pool_input(image_size), 64)}
  expansion = 1 if backbone == 'resnet18' else 4
  for side, _, width, stride in conv3x3_shapes(backbone, image_size):
    out = _after_3x3(side, stride)
    shapes.add((out, width))  # after the 3x3 conv
    if expansion > 1:
      shapes.add((side, width))  # after the first 1x1 conv of a bottleneck
      shapes.add((out, width * expansion))  # after the last 1x1 conv and on the shortcut
    elif stride > 1:
      shapes.add((out, width))  # the shortcut's 1x1 conv
  return shapes
