"""Architecture presets of the papers, sized to the data.

``build(arch, in_shape, n_classes, invertible)`` returns an (uninitialised) Network.
``invertible=True`` gives the target-rule version (square layers above the first,
auxiliary units); ``False`` the ordinary shapes used by BP/FA in the scaling code.

mlp-shallow, mlp-deep  scaling paper, CIFAR-10 (3 / 6 hidden layers of 1024): dense
                       n_in -> 1024 (not invertible), then square 1024 layers; output
                       square 1024 with K units used (invertible) or 1024 -> K; linear
                       output, softmax cross-entropy.
mlp-<W>x<N>            NeurIPS 2020: N hidden layers of width W (784 in the paper, all
                       square), output of width W with K used; leaky ReLU on every layer
                       including the output; MSE to one-hot. Same shapes for every rule,
                       as in the NeurIPS code.
mlp-tower              NeurIPS Fig. 3, the reducing-width network [n_in, n_in, 500, 200, K]:
                       each layer reads the first units of the one below (auxiliary units).
conv7                  scaling paper, ImageNet: conv1 9x9/4 24 ch (not invertible), then
                       square convs (k/s filters, D): 3/2 24 (216), 5/2 48 (600),
                       3/2 48 (432), 3/1 96 (432), 3/2 96 (864), 3/1 192 (864), SAME
                       padding, no pooling; dense output. Shapes are derived from the
                       forward pass (the reference hard-codes a 3x3 final map).
                       Invertible version: the square output layer reads
                       n = max(K, 192 * Hf * Wf) units of the flattened last map (the 192
                       filters, channel-major, topped up with auxiliary channels when
                       K is larger), so conv1's stride is the largest of 4, 2, 1 for which
                       the last map holds n units: 4 at 224 px, 2 at 64 px, 1 at 32 px
                       with 1000 classes. The ordinary version keeps stride 4.
bartunov-mlp           Bartunov et al. 2018 fully connected nets: MNIST (1 channel) 7 hidden
                       layers of 240 tanh units (from Lee et al. 2015); CIFAR-10 (3 channels)
                       3 hidden layers of 1024. Linear output, softmax cross-entropy, Glorot.
bartunov-lc            Bartunov et al. 2018 locally connected nets, layers (receptive field,
                       channels, stride, padding), tanh, then a linear dense output:
                       MNIST (1 channel) (3, 32, 2, SAME), (3, 16, 1, SAME), (3, 16, 1, SAME),
                       (3, 10, 1, VALID); CIFAR-10 (3 channels) (3, 32, 2, SAME),
                       (3, 32, 2, SAME), (3, 16, 1, SAME), (3, 16, 2, SAME), (1, 10, 1, SAME).
simple-vgg             Ernoult et al. 2022's SimpleVGG: five blocks conv 3x3/1 SAME -> ELU ->
                       max-pool 2x2 with 128, 128, 256, 256, 512 channels, then a linear dense
                       output (needs images of at least 32 px).
vgg-<C1>-<C2>-...      the same blocks with the given channels (e.g. vgg-8-16 on MNIST).
"""
from __future__ import annotations

import math
import re

from .activations import ELU, Identity, LeakyReLU, Tanh
from .layers import Conv2D, ConvPool2D, Dense, LocallyConnected2D
from .network import Network

# (kernel, stride, filters) of conv2..conv7 in the scaling paper's ImageNet network
CONV7_SQUARE = [(3, 2, 24), (5, 2, 48), (3, 2, 48), (3, 1, 96), (3, 2, 96), (3, 1, 192)]
CONV1 = (9, 24)  # kernel, filters


class ArchitectureError(ValueError):
    pass


def _dense_stack(in_shape, widths, reads, names):
    layers, prev = [], tuple(in_shape)
    for w, r, n in zip(widths, reads, names):
        layers.append(Dense(prev, w, n_read=r, name=n))
        prev = (w,)
    return layers


def scaling_mlp(in_shape, n_classes, n_hidden, invertible, width=1024, slope=0.1):
    n_in = math.prod(in_shape)
    if invertible and n_classes > width:
        raise ArchitectureError(f"square output of width {width} cannot hold {n_classes} classes")
    widths = [width] * n_hidden + [width if invertible else n_classes]
    names = [f"fc{i + 1}" for i in range(n_hidden)] + ["out"]
    layers = _dense_stack(in_shape, widths, [n_in] + [width] * n_hidden, names)
    return Network(layers, [LeakyReLU(slope)] * n_hidden + [Identity()])


def neurips_mlp(in_shape, n_classes, width, n_hidden, slope=0.1, linear=False):
    n_in = math.prod(in_shape)
    if width > n_in and n_hidden > 0:
        raise ArchitectureError(f"mlp-{width}x{n_hidden}: width {width} exceeds the {n_in} inputs")
    widths = [width] * (n_hidden + 1)
    names = [f"fc{i + 1}" for i in range(n_hidden)] + ["out"]
    layers = _dense_stack(in_shape, widths, [width] * (n_hidden + 1), names)
    f = Identity() if linear else LeakyReLU(slope)
    return Network(layers, [f] * (n_hidden + 1))


def tower_mlp(in_shape, n_classes, widths=(500, 200), slope=0.1):
    n_in = math.prod(in_shape)
    sizes = [n_in, *widths, n_classes]
    names = ["fc1"] + [f"fc{i + 2}" for i in range(len(widths))] + ["out"]
    layers = _dense_stack(in_shape, sizes, sizes, names)
    return Network(layers, [LeakyReLU(slope)] * len(layers))


# (receptive field, channels, stride, padding) of Bartunov et al.'s locally connected nets
BARTUNOV_LC_MNIST = [(3, 32, 2, "same"), (3, 16, 1, "same"), (3, 16, 1, "same"), (3, 10, 1, "valid")]
BARTUNOV_LC_CIFAR = [(3, 32, 2, "same"), (3, 32, 2, "same"), (3, 16, 1, "same"), (3, 16, 2, "same"),
                     (1, 10, 1, "same")]
SIMPLE_VGG = (128, 128, 256, 256, 512)


def _learned_inverse_only(arch, invertible):
    if invertible:
        raise ArchitectureError(f"{arch} is for rules with learned or no inverses (bp, fa, dfa, dtp, sdtp, "
                                "ldrl); it has no exact-inverse version")


def _one_or_three_channels(arch, in_shape):
    if len(in_shape) != 3 or in_shape[0] not in (1, 3):
        raise ArchitectureError(f"{arch} is defined for MNIST-like (1, H, W) and CIFAR-like (3, H, W) "
                                f"images, got input shape {in_shape}")
    return in_shape[0] == 1


def bartunov_mlp(in_shape, n_classes, hidden=None, invertible=False):
    _learned_inverse_only("bartunov-mlp", invertible)
    n_in = math.prod(in_shape)
    if hidden is None:
        hidden = (240,) * 7 if len(in_shape) != 3 or in_shape[0] == 1 else (1024,) * 3
    sizes = list(hidden) + [n_classes]
    layers = _dense_stack(in_shape, sizes, [n_in] + list(hidden), [f"fc{i + 1}" for i in range(len(hidden))] + ["out"])
    return Network(layers, [Tanh()] * len(hidden) + [Identity()])


def bartunov_lc(in_shape, n_classes, invertible=False):
    _learned_inverse_only("bartunov-lc", invertible)
    spec = BARTUNOV_LC_MNIST if _one_or_three_channels("bartunov-lc", in_shape) else BARTUNOV_LC_CIFAR
    layers, prev = [], tuple(in_shape)
    for i, (k, c, s, pad) in enumerate(spec):
        layers.append(LocallyConnected2D(prev, k, s, n_out=c, padding=pad, name=f"lc{i + 1}"))
        prev = layers[-1].out_shape
    layers.append(Dense(prev, n_classes, name="out"))
    return Network(layers, [Tanh()] * len(spec) + [Identity()])


def vgg(in_shape, n_classes, channels=SIMPLE_VGG, invertible=False, name="simple-vgg"):
    _learned_inverse_only(name, invertible)
    if len(in_shape) != 3:
        raise ArchitectureError(f"{name} needs image input (C, H, W), got shape {in_shape}")
    need = 2 ** len(channels)
    if min(in_shape[1:]) < need:
        raise ArchitectureError(f"{name}: {len(channels)} max-pooling blocks need images of at least "
                                f"{need} px, got {in_shape[1]}x{in_shape[2]}")
    layers, prev = [], tuple(in_shape)
    for i, c in enumerate(channels):
        layers.append(ConvPool2D(prev, 3, 1, n_out=c, padding="same", name=f"block{i + 1}"))
        prev = layers[-1].out_shape
    layers.append(Dense(prev, n_classes, name="out"))
    return Network(layers, [ELU()] * len(channels) + [Identity()])


def conv7(in_shape, n_classes, invertible, slope=0.1):
    if len(in_shape) != 3:
        raise ArchitectureError(f"conv7 needs image input (C, H, W), got shape {in_shape}")
    strides = (4, 2, 1) if invertible else (4,)
    for s1 in strides:
        layers = [Conv2D(in_shape, CONV1[0], s1, n_out=CONV1[1], name="conv1")]
        read = CONV1[1]
        for i, (k, s, filters) in enumerate(CONV7_SQUARE):
            prev = layers[-1].out_shape
            layers.append(Conv2D(prev, k, s, n_out=None if invertible else filters,
                                 c_read=read if invertible else None, name=f"conv{i + 2}"))
            read = filters
        C, Hf, Wf = layers[-1].out_shape
        if not invertible:
            layers.append(Dense(layers[-1].out_shape, n_classes, name="out"))
            break
        n = max(n_classes, read * Hf * Wf)
        if n <= C * Hf * Wf:
            layers.append(Dense(layers[-1].out_shape, n, n_read=n, name="out"))
            break
    else:
        raise ArchitectureError(f"conv7: a {in_shape[1]}x{in_shape[2]} input is too small for a square "
                                f"output layer holding {n_classes} classes")
    return Network(layers, [LeakyReLU(slope)] * (len(layers) - 1) + [Identity()])


ARCHS = ("mlp-shallow", "mlp-deep", "mlp-<W>x<N>", "mlp-tower", "conv7", "bartunov-mlp", "bartunov-lc",
         "simple-vgg", "vgg-<C1>-<C2>-...")


def build(arch: str, in_shape, n_classes: int, invertible: bool, linear: bool = False) -> Network:
    """The preset ``arch`` for inputs of ``in_shape`` and ``n_classes`` classes."""
    in_shape = tuple(in_shape)
    if arch == "mlp-shallow":
        return scaling_mlp(in_shape, n_classes, 3, invertible)
    if arch == "mlp-deep":
        return scaling_mlp(in_shape, n_classes, 6, invertible)
    m = re.fullmatch(r"mlp-(\d+)x(\d+)", arch)
    if m:
        return neurips_mlp(in_shape, n_classes, int(m.group(1)), int(m.group(2)), linear=linear)
    if arch == "mlp-tower":
        return tower_mlp(in_shape, n_classes)
    if arch == "conv7":
        return conv7(in_shape, n_classes, invertible)
    if arch == "bartunov-mlp":
        return bartunov_mlp(in_shape, n_classes, invertible=invertible)
    if arch == "bartunov-lc":
        return bartunov_lc(in_shape, n_classes, invertible=invertible)
    if arch == "simple-vgg":
        return vgg(in_shape, n_classes, invertible=invertible)
    m = re.fullmatch(r"vgg((?:-\d+)+)", arch)
    if m:
        return vgg(in_shape, n_classes, [int(c) for c in m.group(1)[1:].split("-")], invertible, name=arch)
    raise ArchitectureError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
