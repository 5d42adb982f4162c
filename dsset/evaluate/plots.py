"""PNG figures of one evaluation run (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def confusion_matrix(counts: np.ndarray, path: str, title: str) -> None:
  fig, ax = plt.subplots(figsize=(4, 4))
  ax.imshow(counts, cmap='Blues')
  for (i, j), n in np.ndenumerate(counts):
    ax.text(j, i, str(n), ha='center', va='center',
            color='white' if n > counts.max() / 2 else 'black')
  ax.set_xlabel('predicted class')
  ax.set_ylabel('true class')
  ax.set_xticks(range(len(counts)))
  ax.set_yticks(range(len(counts)))
  ax.set_title(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def training_curve(losses: np.ndarray, path: str, title: str, xlabel: str) -> None:
  fig, ax = plt.subplots(figsize=(5, 3.5))
  ax.plot(np.arange(1, len(losses) + 1), losses)
  ax.set_xlabel(xlabel)
  ax.set_ylabel('training loss')
  ax.set_yscale('log')
  ax.set_title(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def pca_2d(features: np.ndarray) -> np.ndarray:
  """The first two principal-component coordinates of `features` [N, D] (zeros if N < 2)."""
  centred = features - features.mean(axis=0)
  if len(features) < 2:
    return np.zeros((len(features), 2))
  _, _, vt = np.linalg.svd(centred, full_matrices=False)
  coords = centred @ vt[:2].T
  return np.pad(coords, ((0, 0), (0, 2 - coords.shape[1])))


def embedding_map(features: np.ndarray, labels: np.ndarray, path: str, title: str) -> None:
  coords = pca_2d(features)
  fig, ax = plt.subplots(figsize=(4.5, 4))
  for label in np.unique(labels):
    keep = labels == label
    ax.scatter(coords[keep, 0], coords[keep, 1], s=12, label=f'class {label}')
  ax.set_xlabel('PC 1')
  ax.set_ylabel('PC 2')
  ax.legend(fontsize=8)
  ax.set_title(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def segmentation_grid(images: np.ndarray, truth: np.ndarray, pred: np.ndarray, num_classes: int,
                      path: str, title: str) -> None:
  """One row per slice: the image, its ground-truth mask and the predicted mask.

  images: [N, H, W] grey; truth, pred: integer masks [N, H, W] with ids 0..num_classes-1.
  """
  rows = len(images)
  # Fixed colour limits, so that a class id has the same colour in every panel (tab10: 10 ids).
  mask_limit = max(9, num_classes - 1)
  fig, axes = plt.subplots(rows, 3, figsize=(6, 2 * rows + 0.4), squeeze=False)
  for row in range(rows):
    axes[row, 0].imshow(images[row], cmap='gray', vmin=0, vmax=255)
    for ax, mask in zip(axes[row, 1:], (truth[row], pred[row])):
      ax.imshow(mask, cmap='tab10', vmin=0, vmax=mask_limit, interpolation='nearest')
  for ax in axes.ravel():
    ax.set_xticks([])
    ax.set_yticks([])
  for ax, name in zip(axes[0], ('image', 'ground truth', 'prediction')):
    ax.set_title(name, fontsize=9)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
