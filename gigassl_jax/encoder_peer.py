"""PyTorch twin of the ResNet18 tile encoder, for tests and benchmarks only.

Never a runtime dependency: importing this module imports torch. Written with
plain torch (torchvision is not a dependency); module names match torchvision,
so its state_dict keys do and `encoders.get_encoder("resnet18", path)` loads a
saved state_dict.
"""

from __future__ import annotations

import torch
from torch import nn

from gigassl_jax import encoders


class BasicBlock(nn.Module):
  def __init__(self, cin, cout, stride):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(cout)
    self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(cout)
    self.downsample = None
    if stride != 1 or cin != cout:
      self.downsample = nn.Sequential(
        nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
      )

  def forward(self, x):
    idt = x if self.downsample is None else self.downsample(x)
    y = torch.relu(self.bn1(self.conv1(x)))
    return torch.relu(self.bn2(self.conv2(y)) + idt)


class ResNet18(nn.Module):
  """torchvision's ResNet18; `forward` is the Giga-SSL trunk (conv1..layer3 + mean).

  layer4 and fc exist so that the state_dict is a whole torchvision one; the
  trunk does not use them.
  """

  def __init__(self):
    super().__init__()
    self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(64)
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    cin = 64
    for i, (cout, stride) in enumerate(((64, 1), (128, 2), (256, 2), (512, 2))):
      setattr(
        self,
        f"layer{i + 1}",
        nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)),
      )
      cin = cout
    self.fc = nn.Linear(512, 1000)

  def forward(self, x):
    """ImageNet-normalised NCHW -> [B, 256] (layer3, spatial mean)."""
    x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
    return self.layer3(self.layer2(self.layer1(x))).mean(dim=(2, 3))

  def trunk_features(self, images_nhwc01):
    """Same contract as the JAX encoder: NHWC in [0, 1] -> [B, 256]."""
    return self(normalise(images_nhwc01))


def normalise(images_nhwc01):
  """NHWC [0, 1] -> ImageNet-normalised NCHW."""
  mean = torch.tensor(encoders.IMAGENET_MEAN).view(1, 3, 1, 1)
  std = torch.tensor(encoders.IMAGENET_STD).view(1, 3, 1, 1)
  return (images_nhwc01.permute(0, 3, 1, 2) - mean) / std


def resnet18(seed: int | None = None) -> ResNet18:
  """A random ResNet18 in eval mode with random BN statistics and affines.

  Non-trivial BN parameters make a wrong BN fold or a swapped statistic show.
  """
  if seed is not None:
    torch.manual_seed(seed)
  model = ResNet18().eval()
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, nn.BatchNorm2d):
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_(0, 0.2)
        m.running_mean.normal_(0, 0.2)
        m.running_var.uniform_(0.5, 2.0)
  return model
