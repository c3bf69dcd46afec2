"""The ImageNet ResNet of He et al. (2015), its plain twins, and its multi-stage feature view.

:class:`ResNet` is the classifier. Its parameter names equal torchvision's (``conv1``, ``bn1``,
``layer1``..``layer4``, ``fc``), so ``ResNet.load_state_dict(torchvision_resnet.state_dict())``
is strict and the logits are equal. :class:`ResNetBackbone` is the same network without the
classifier whose ``forward`` returns ``{"stem", "res2".."res5"}`` (or FPN's ``p2``..``p6``).
"""

from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple, Type, Union

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .blocks import BasicBlock, Bottleneck, block_stride
from .features import ShapeSpec, feature_entry, select_features, shapes_from_info, take_indices
from .layers import get_norm_layer, is_norm, set_bn_eval

STAGE_NAMES = ("res2", "res3", "res4", "res5")
LEVEL_NAMES = ("stem",) + STAGE_NAMES
BlockType = Type[Union[BasicBlock, Bottleneck]]


class PoolTypeError(ValueError, AssertionError):
    """An unsupported ``global_pool``; also an ``AssertionError``, which timm's models raise for a pool type
    they lack (callers such as timm's tests catch that)."""


class ResNet(nn.Module):
    """ResNet classifier: 7x7 stem, max-pool, four stages of residual (or plain) blocks, pooling, fc.

    Args:
        block: :class:`BasicBlock` or :class:`Bottleneck`.
        layers: blocks per stage, e.g. ``(3, 4, 6, 3)`` for ResNet-50; three stages for the CIFAR
            nets (``(3, 3, 3)`` for ResNet-20).
        num_classes: classifier outputs; 0 builds no classifier (``fc`` is an ``Identity``).
        in_chans: input channels (3 for RGB, 1 for grayscale).
        stem_type: ``"imagenet"`` (7x7 stride-2 conv + 3x3 stride-2 max-pool) or ``"cifar"`` (one
            3x3 stride-1 conv, no pooling; the paper's section 4.2 nets for 32x32 inputs).
        stem_width: output channels of the stem conv (64 ImageNet, 16 CIFAR).
        widths: base width of each stage (output channels are ``width * block.expansion``); default
            64/128/256/512 (four stages) or 16/32/64 (three).
        shortcut: ``"A"``, ``"B"`` (default) or ``"C"``, see :mod:`res_backbone.blocks`.
        residual: ``False`` builds the plain twin (no shortcuts).
        stride_in_1x1: bottleneck stride in the first 1x1 (paper) instead of the 3x3 (v1.5).
        output_stride: 32, 16 or 8; 16/8 replace the strides of res5 (and res4) by dilation.
        norm: ``"bn"``, ``"frozen_bn"``, ``"sync_bn"`` or ``"gn"``.
        norm_eval: keep every BatchNorm in eval mode (fixed statistics) while training.
        frozen_stages: freeze the first ``k`` levels: 1 = stem, 2 = stem + res2, ... 5 = all.
        zero_init_last: zero the last norm scale of each residual block.
        drop_rate: dropout before the classifier.
        global_pool: ``"avg"``, or ``""`` for no pooling: the head then returns the unpooled map,
            with ``fc`` applied as a 1x1 convolution when there is a classifier (per-position
            scores, the paper's fully-convolutional testing).
    """

    def __init__(
        self,
        block: BlockType,
        layers: Sequence[int],
        *,
        num_classes: int = 1000,
        in_chans: int = 3,
        stem_type: str = "imagenet",
        stem_width: Optional[int] = None,
        widths: Optional[Sequence[int]] = None,
        shortcut: str = "B",
        residual: bool = True,
        stride_in_1x1: bool = False,
        output_stride: int = 32,
        norm: str = "bn",
        norm_eval: bool = False,
        frozen_stages: int = 0,
        zero_init_last: bool = False,
        drop_rate: float = 0.0,
        global_pool: str = "avg",
    ):
        super().__init__()
        if widths is None:
            widths = (64, 128, 256, 512) if len(layers) == 4 else (16, 32, 64)
        if len(layers) not in (3, 4) or len(widths) != len(layers):
            raise ValueError(
                f"ResNet needs 4 stages (ImageNet) or 3 (CIFAR); got layers={tuple(layers)}, widths={tuple(widths)}"
            )
        if stem_type not in ("imagenet", "cifar"):
            raise ValueError(f"stem_type must be 'imagenet' or 'cifar', got {stem_type!r}")
        if stem_width is None:
            stem_width = 64 if stem_type == "imagenet" else widths[0]
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 32, 16 or 8, got {output_stride}")
        if output_stride != 32 and block is not Bottleneck:
            raise ValueError(
                f"output_stride={output_stride} replaces strides by dilation, which needs bottleneck "
                f"blocks (resnet50/101/152 and plain50/101/152); this model uses {block.__name__}"
            )
        self.num_stages = len(layers)
        if not 0 <= frozen_stages <= self.num_stages + 1:
            raise ValueError(
                f"frozen_stages must be in 0..{self.num_stages + 1} (1 = stem, {self.num_stages + 1} = all stages), "
                f"got {frozen_stages}"
            )
        norm_layer = get_norm_layer(norm)
        self.norm, self.norm_eval, self.frozen_stages = norm, norm_eval, frozen_stages
        self.num_classes, self.drop_rate, self.in_chans = num_classes, drop_rate, in_chans

        # Registration order = execution order (timm's FeatureListNet walks the children in order).
        self.stem_type = stem_type
        imagenet = stem_type == "imagenet"
        self.conv1 = nn.Conv2d(in_chans, stem_width, 7 if imagenet else 3, stride=2 if imagenet else 1,
                               padding=3 if imagenet else 1, bias=False)
        self.bn1 = norm_layer(stem_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool: nn.Module = nn.MaxPool2d(3, stride=2, padding=1) if imagenet else nn.Identity()

        # Dilation instead of stride for the last stages (DeepLab's "atrous" trick), placed as
        # torchvision does: the first block of a dilated stage still uses the previous dilation.
        dilate = {32: (False, False, False), 16: (False, False, True), 8: (False, True, True)}[output_stride]
        dilate = dilate[len(dilate) - (len(layers) - 1):]
        in_ch, dilation = stem_width, 1
        for i, (n, width) in enumerate(zip(layers, widths)):
            stride = 1 if i == 0 else 2
            prev_dilation = dilation
            if i > 0 and dilate[i - 1]:
                dilation *= stride
                stride = 1
            blocks = []
            for j in range(n):
                blocks.append(
                    block(
                        in_ch,
                        width,
                        stride=stride if j == 0 else 1,
                        dilation=prev_dilation if j == 0 else dilation,
                        norm_layer=norm_layer,
                        shortcut=shortcut,
                        residual=residual,
                        stride_in_1x1=stride_in_1x1,
                    )
                )
                in_ch = blocks[-1].out_channels
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        if self.num_stages == 3:  # keeps forward_features scriptable; holds no parameters
            self.layer4 = nn.Identity()

        self.num_features = self.head_hidden_size = in_ch
        self.grad_checkpointing = False
        self.global_pool = ""
        self.avgpool: nn.Module = nn.Identity()
        self.fc: nn.Module = nn.Identity()
        self.reset_classifier(num_classes, global_pool)
        self._init_weights(zero_init_last)
        # Every level the network computes, in execution order: the one description of the stages that
        # feature_info, forward_stages, forward_intermediates and prune_intermediate_layers all read.
        self.level_info = self._build_feature_info()
        self.feature_info = [dict(f) for f in self.level_info]
        self._apply_freeze()

    # ------------------------------------------------------------------ construction helpers
    def _init_weights(self, zero_init_last: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif is_norm(m) and isinstance(getattr(m, "weight", None), nn.Parameter):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_last:
            for m in self.modules():
                if hasattr(m, "zero_init_last"):
                    m.zero_init_last()

    def stages(self) -> List[nn.Module]:
        """The stages ``layer1``..``layer4`` (``res2``..``res5``) that this module still holds
        (``layer1``..``layer3`` = ``res2``..``res4`` in a CIFAR net)."""
        found = [getattr(self, f"layer{i}", None) for i in range(1, 5)]
        return [m for m in found if isinstance(m, nn.Sequential)]

    def _build_feature_info(self) -> List[dict]:
        stride = self.conv1.stride[0] * getattr(self.maxpool, "stride", 1)
        info = [feature_entry("stem", self.conv1.out_channels, self.conv1.stride[0], "relu")]
        for i, stage in enumerate(self.stages()):
            for b in stage:
                stride *= block_stride(b)
            info.append(feature_entry(STAGE_NAMES[i], stage[-1].out_channels, stride, f"layer{i + 1}"))
        return info

    def output_shape(self) -> Dict[str, ShapeSpec]:
        """``{name: (channels, stride)}`` for every level this network computes."""
        return shapes_from_info(self.feature_info)

    # ------------------------------------------------------------------ freezing and BN policy
    def _frozen_modules(self) -> List[nn.Module]:
        mods: List[nn.Module] = []
        if self.frozen_stages >= 1:
            mods += [self.conv1, self.bn1]
        mods += self.stages()[: max(0, self.frozen_stages - 1)]
        return mods

    def _apply_freeze(self) -> None:
        for m in self._frozen_modules():
            m.requires_grad_(False)
        self.train(self.training)

    def freeze(self, frozen_stages: int) -> "ResNet":
        """Freeze stem..level ``frozen_stages`` (1 = stem, 2 = +res2, ..., 5 = all): no gradients,
        BatchNorm statistics fixed. Earlier freezing is not undone by a smaller value; build anew."""
        if not 0 <= frozen_stages <= self.num_stages + 1:
            raise ValueError(f"frozen_stages must be in 0..{self.num_stages + 1}, got {frozen_stages}")
        self.frozen_stages = max(self.frozen_stages, frozen_stages)
        self._apply_freeze()
        return self

    def unfreeze(self) -> "ResNet":
        """Make every parameter trainable again and BatchNorm statistics follow ``norm_eval``."""
        self.frozen_stages = 0
        for p in self.parameters():
            p.requires_grad_(True)
        self.train(self.training)
        return self

    def train(self, mode: bool = True) -> "ResNet":
        super().train(mode)
        if mode:
            if self.norm_eval:
                set_bn_eval(self)
            else:
                for m in self._frozen_modules():
                    set_bn_eval(m)
        return self

    # ------------------------------------------------------------------ forward
    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn1(self.conv1(x)))

    def forward_stages(self, x: torch.Tensor, out_features: Sequence[str] = LEVEL_NAMES) -> Dict[str, torch.Tensor]:
        """Return ``{name: feature map}`` for the requested levels, ordered fine to coarse.

        Args:
            x: images ``(N, C_in, H, W)``, normalised.
            out_features: any of ``stem``, ``res2``..``res5``; stages after the last one are not run.

        Returns:
            ``OrderedDict`` name -> ``(N, C, ceil(H / stride), ceil(W / stride))``.
        """
        names = [f["name"] for f in self.level_info]
        take = [i for i, n in enumerate(names) if n in out_features]
        if not take:
            return OrderedDict()
        feats = self.forward_intermediates(x, take, stop_early=True, intermediates_only=True)
        return OrderedDict((names[i], f) for i, f in zip(take, feats))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, Sequence[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """timm 1.0's feature API: the final map and the maps of the chosen levels of ``feature_info``.

        Args:
            x: images ``(N, C_in, H, W)``, normalised.
            indices: levels of ``feature_info`` (0 = ``stem``, 1.. = ``res2``..): ``None`` all, an int
                ``n`` the last ``n``, or a list (negative counts from the end).
            norm: accepted for timm's signature; a ResNet has no final norm, so it changes nothing.
            stop_early: skip the stages after the deepest requested level (the returned final map is
                then that level's).
            output_fmt: only ``"NCHW"``.
            intermediates_only: return only the list.

        Returns:
            ``(final, [maps])`` or ``[maps]``; ``final`` equals :meth:`forward_features` unless
            ``stop_early`` stopped before the last stage; map ``i`` is ``(N, num_chs_i, ~H/r_i, ~W/r_i)``.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt={output_fmt!r}: a ResNet's feature maps are 'NCHW' only")
        taken, deepest = take_indices(len(self.level_info), indices)
        out: Dict[int, torch.Tensor] = {}  # only the requested maps stay alive, as in forward_features
        x = self.stem(x)
        if 0 in taken:
            out[0] = x
        x = self.maxpool(x)
        last = deepest if stop_early else len(self.level_info) - 1
        for i in range(1, last + 1):
            x = self._run_stage(getattr(self, self.level_info[i]["module"]), x)
            if i in taken:
                out[i] = x
        feats = [out[i] for i in taken]
        return feats if intermediates_only else (x, feats)

    def prune_intermediate_layers(self, indices: Union[int, Sequence[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Remove what :meth:`forward_intermediates` no longer needs for ``indices`` (timm 1.0's API).

        Stages after the deepest level become empty ``nn.Sequential`` (no parameters, so DDP sees none
        unused; ``forward_features`` then ends at that level and ``num_features`` is its width); the
        classifier goes when ``prune_head`` or when stages were cut. ``feature_info`` is unchanged, so
        the returned indices stay valid. ``prune_norm`` is accepted for timm's signature (no final norm).

        Returns:
            The absolute indices to pass to :meth:`forward_intermediates`.
        """
        taken, deepest = take_indices(len(self.level_info), indices)
        for level in self.level_info[deepest + 1:]:
            setattr(self, level["module"], nn.Sequential())  # empty, still iterable by _run_stage
        if deepest == 0:
            self.maxpool = nn.Identity()
        cut = deepest < len(self.level_info) - 1
        if cut:
            self.num_features = self.head_hidden_size = self.level_info[deepest]["num_chs"]
        if prune_head or cut:
            self.reset_classifier(0, "")
        return taken

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map ``(N, num_features, H/32, W/32)``, ``H/4`` for CIFAR nets (timm's contract)."""
        x = self.maxpool(self.stem(x))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return self._checkpointed(self.stages(), x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)

    @torch.jit.unused
    def _checkpointed(self, stages: List[nn.Module], x: torch.Tensor) -> torch.Tensor:
        for stage in stages:
            x = self._run_stage(stage, x)
        return x

    @torch.jit.unused
    def _run_stage(self, stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and self.training:
            for block in stage:
                x = checkpoint(block, x, use_reentrant=False)
            return x
        return stage(x)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of storing them
        (training memory roughly drops to one block's activations per stage, for ~30% more time)."""
        self.grad_checkpointing = enable

    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups for layer-wise learning-rate decay (timm's convention)."""
        return {"stem": r"^conv1|^bn1", "blocks": r"^layer(\d+)" if coarse else r"^layer(\d+)\.(\d+)"}

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool (unless ``global_pool=""``), dropout, classify; ``pre_logits`` stops before ``fc``."""
        if self.global_pool:
            x = torch.flatten(self.avgpool(x), 1)
        if self.drop_rate > 0:
            x = nn.functional.dropout(x, p=self.drop_rate, training=self.training)
        if pre_logits:
            return x
        if not self.global_pool:  # unpooled: fc as a 1x1 convolution over every position
            return self.fc(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    # ------------------------------------------------------------------ timm classifier API
    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the classifier (``num_classes=0``: none); ``global_pool=None`` keeps the pooling.

        The new layer is created on the device and dtype of the existing parameters.
        """
        global_pool = self.global_pool if global_pool is None else global_pool
        if global_pool not in ("avg", ""):
            raise PoolTypeError(f"global_pool must be 'avg' or '' (no pooling), got {global_pool!r}")
        ref = self.conv1.weight
        self.num_classes, self.global_pool = num_classes, global_pool
        self.avgpool = nn.AdaptiveAvgPool2d(1) if global_pool else nn.Identity()
        if num_classes > 0:
            self.fc = nn.Linear(self.num_features, num_classes, device=ref.device, dtype=ref.dtype)
        else:
            self.fc = nn.Identity()
        self.avgpool.train(self.training)
        self.fc.train(self.training)


class ResNetBackbone(ResNet):
    """A ResNet without its classifier whose ``forward`` returns named multi-stage features.

    Stages after the coarsest requested level are not built (``out_features=("res4",)`` has no
    ``layer4``). Parameter names equal torchvision's minus ``fc`` (plus ``fpn.*`` with an FPN).

    Args:
        out_features: levels to return, any of ``stem``, ``res2``..``res5`` (``res4`` is the last of
            a CIFAR net); default every stage. :meth:`attach_fpn` puts an FPN on top; ``forward``
            then returns its ``p*`` levels instead.
        **kwargs: passed to :class:`ResNet`.
    """

    def __init__(self, block: BlockType, layers: Sequence[int], *, out_features: Optional[Sequence[str]] = None,
                 **kwargs):
        kwargs["num_classes"] = 0
        super().__init__(block, layers, **kwargs)
        if out_features is None:
            out_features = [f["name"] for f in self.feature_info if f["name"] != "stem"]
        selected = select_features(self.feature_info, out_features)
        self.out_features = [f["name"] for f in selected]
        last = max(LEVEL_NAMES.index(n) for n in self.out_features)
        for i in range(last + 1, 5):  # drop stages nothing asks for
            delattr(self, f"layer{i}")
        self.level_info = self.level_info[: last + 1]
        del self.fc, self.avgpool
        self.body_info = [f for f in self.feature_info if f["name"] in self.out_features]
        self.fpn: Optional[nn.Module] = None
        self._set_info(self.body_info)

    def _set_info(self, info: List[dict]) -> None:
        self.feature_info = info
        widths = {f["num_chs"] for f in info}
        if len(widths) == 1:
            self.out_channels = widths.pop()
        elif hasattr(self, "out_channels"):
            del self.out_channels

    def attach_fpn(self, fpn: nn.Module) -> "ResNetBackbone":
        """Put ``fpn`` (built over this backbone's ``output_shape()``) on top of the features."""
        self.fpn = fpn
        self._set_info(fpn.feature_info)
        return self

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return shapes_from_info(self.feature_info)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        feats = self.forward_stages(x, self.out_features)
        if self.fpn is not None:
            return self.fpn(feats)
        return feats

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("a ResNetBackbone returns a dict of levels: call it directly")

    def prune_intermediate_layers(self, *args, **kwargs) -> List[int]:
        raise NotImplementedError("a ResNetBackbone builds only the stages up to its last out_features level; "
                                  "choose them with create_backbone(name, out_features=...)")

