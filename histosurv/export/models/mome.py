"""MoME: Mixture of Multimodal Experts for cancer survival (Xiong et al., MICCAI 2024).

The reference is ``BearCleverProud/MoME`` ``models/model_mome.py`` (class ``MoMETransformer``);
submodule names and ``nn.Sequential`` indices are the reference's, so its state_dicts load as they are.

* patches: Linear(1024 -> 512) + ReLU + Dropout per patch (``wsi_net``);
* genes: the 6 signature groups, each through SNN(g_i -> 512) -> SNN(512 -> 512) (``sig_networks``);
* Biased Progressive Encoding: four MoME layers, alternately refining the patch tokens with the gene
  tokens and the gene tokens with the patch tokens (patho1, genom1, patho2, genom2);
* each MoME layer holds four experts (TransFusion, BottleneckTransFusion, AddFusion, DropX2Fusion)
  and a router; the router's argmax picks ONE expert per layer per patient (the reference's hard
  routing; the routing probabilities do not scale the expert's output);
* head: [class token; patch tokens; gene tokens] -> TransLayer -> class token -> Linear(512 -> 4).

``TransLayer`` = norm -> Nystrom attention (8 heads x 64, 256 landmarks, see :mod:`.nystrom`) with the
Admin residual of ``admin_torch.as_module(8)``: ``x * omega + attn(norm(x))``, omega a buffer.

Deviations from the reference, each for the runtime:

* Inference is ONE deterministic pass over the whole bag. The reference's trainer
  (``trainer/mb_trainer.py``) shuffles the patches, splits them into chunks of <= 4096, runs the model
  per chunk and averages the risks, also at validation; that is stochastic and not one function of
  the bag. Expect small differences from its reported numbers on bags above 4096 patches.
* The reference's ``BottleneckTransFusion.bottleneck`` and ``cls_multimodal`` are plain tensors made
  with ``torch.rand(...).cuda()``; here they are parameters, so they travel with the weights.
* The routing is inside the exported graph, so it routes at every N (see :class:`MoME`): the serving
  graph (one bag) branches on the route with ONNX ``If`` and runs only the chosen expert; a batch runs
  every expert and selects each patient's, so it may mix patients routed differently.
* Nystrom attention's padding follows N at run time, and its pseudo-inverse scale is per bag (see
  :mod:`.nystrom`); at batch size 1 this is the reference's computation.
* At N = 1 the reference fails (``squeeze()`` drops the patch axis); here N = 1 is a bag of one patch.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .base import GeneScaler, SurvivalModel, check_attention_impl
from .blocks import patch_embedding, snn_block, split_groups
from .checkpoints import ReferenceFormat, strip_module_prefix
from .nystrom import NystromAttention
from .survival_head import n_outputs

__all__ = ["MoMEConfig", "MoMETransformer", "EXPERTS"]

EXPERTS = ("TransFusion", "BottleneckTransFusion", "AddFusion", "DropX2Fusion")  # the router's index order
LAYERS = ("MoME_patho1", "MoME_genom1", "MoME_patho2", "MoME_genom2")  # applied in this order
ADMIN_LAYERS = 8  # admin_torch.as_module(8)


@dataclass(frozen=True)
class MoMEConfig:
    n_genes: int = 0  # G; 0 takes sum(omic_sizes), anything else must equal it
    omic_sizes: tuple[int, ...] = (100, 200, 300, 400, 500, 600)  # genes per signature group, in order
    feature_dim: int = 1024
    dim: int = 512  # token width (the reference's 'small')
    n_bottlenecks: int = 2  # bottleneck tokens that carry information between the modalities
    heads: int = 8
    num_landmarks: int = 256  # landmarks of the Nystrom attention (the reference ties them to dim // 2)
    pinv_iterations: int = 6  # Newton iterations of the Nystrom pseudo-inverse
    dropout: float = 0.25  # patch embedding and SNNs
    attn_dropout: float = 0.1  # dropout on the attention weights in training
    survival_head: str = "discrete"
    n_bins: int = 4

    def __post_init__(self):
        object.__setattr__(self, "omic_sizes", tuple(int(s) for s in self.omic_sizes))
        total = sum(self.omic_sizes)
        if not self.omic_sizes or min(self.omic_sizes) < 1:
            raise ValueError(f"omic_sizes must list at least one group of at least one gene, got {self.omic_sizes}")
        if self.n_genes == 0:
            object.__setattr__(self, "n_genes", total)
        elif self.n_genes != total:
            raise ValueError(
                f"n_genes = {self.n_genes} but omic_sizes {self.omic_sizes} sum to {total}: "
                "the genes are split into those groups in order, so the two must agree"
            )
        if self.dim % self.heads:
            raise ValueError(f"dim = {self.dim} must be divisible by heads = {self.heads}")
        for name in ("feature_dim", "dim", "n_bottlenecks", "num_landmarks", "pinv_iterations"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        n_outputs(self.survival_head, self.n_bins)

    def to_dict(self) -> dict:
        return asdict(self)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight (the reference's ``RMSNorm``, eps 1e-6)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # NOTE: x / sqrt(.), not the reference's x * rsqrt(.) (the same to a rounding): onnxscript's ORT
        # fusions turn the rsqrt form into SimplifiedLayerNormalization in the ONNX domain, which
        # onnx.checker rejects at opset 20.
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class AdminResidual(nn.Module):
    """``admin_torch.as_module(n)`` (OmegaResidual, buffer form): x * omega + f(x)."""

    def __init__(self, num_res_layers: int = ADMIN_LAYERS):
        super().__init__()
        omega = ((num_res_layers + 1) / math.log(num_res_layers + 1) - 1) ** 0.5  # 'O(logn)' default
        self.register_buffer("omega", torch.tensor([omega]))

    def forward(self, x: torch.Tensor, f_x: torch.Tensor) -> torch.Tensor:
        return x * self.omega + f_x


class TransLayer(nn.Module):
    def __init__(self, cfg: MoMEConfig, norm_layer=nn.LayerNorm):
        super().__init__()
        self.norm = norm_layer(cfg.dim)
        self.residual_attn = AdminResidual()
        self.attn = NystromAttention(
            cfg.dim, cfg.dim // cfg.heads, cfg.heads, cfg.num_landmarks, cfg.pinv_iterations, dropout=cfg.attn_dropout
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.residual_attn(x, self.attn(self.norm(x)))

    def with_cls_row(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, row = self.attn(self.norm(x), cls_row=True)
        return self.residual_attn(x, out), row


class TransFusion(nn.Module):
    """[x1; x2] -> TransLayer (RMSNorm, as the reference passes its norm_layer) -> x1's positions."""

    def __init__(self, cfg: MoMEConfig):
        super().__init__()
        self.translayer = TransLayer(cfg, RMSNorm)

    def forward(self, x1, x2):
        return self.translayer(torch.cat([x1, x2], dim=1))[:, : x1.shape[1]]


class BottleneckTransFusion(nn.Module):
    """Bottleneck tokens read x2, then x1 reads the bottleneck tokens."""

    def __init__(self, cfg: MoMEConfig):
        super().__init__()
        self.attn1 = TransLayer(cfg)
        self.attn2 = TransLayer(cfg)
        # The reference: torch.rand(...).cuda(), outside its state_dict (see MoMETransformer.REFERENCE).
        self.bottleneck = nn.Parameter(torch.rand(1, cfg.n_bottlenecks, cfg.dim))

    def forward(self, x1, x2):
        nb = self.bottleneck.shape[1]
        z = torch.cat([self.bottleneck.expand(x2.shape[0], -1, -1), x2], dim=1)  # (B, nb + T2, D)
        z = self.attn2(z)[:, :nb]
        return self.attn1(torch.cat([x1, z], dim=1))[:, : x1.shape[1]]


class AddFusion(nn.Module):
    """SNN(RMSNorm(x1)) + token mean of SNN(RMSNorm(x2))."""

    def __init__(self, cfg: MoMEConfig):
        super().__init__()
        self.snn1 = snn_block(cfg.dim, cfg.dim)
        self.snn2 = snn_block(cfg.dim, cfg.dim)
        self.norm1 = RMSNorm(cfg.dim)
        self.norm2 = RMSNorm(cfg.dim)

    def forward(self, x1, x2):
        return self.snn1(self.norm1(x1)) + self.snn2(self.norm2(x2)).mean(dim=1, keepdim=True)


class DropX2Fusion(nn.Module):
    def forward(self, x1, x2):
        return x1


class RoutingNetwork(nn.Module):
    """(B, T1, D), (B, T2, D) -> (B, 4) routing probabilities (softmax at temperature 1)."""

    def __init__(self, cfg: MoMEConfig):
        super().__init__()
        self.fc1 = nn.Sequential(nn.Linear(cfg.dim, cfg.dim), RMSNorm(cfg.dim), nn.GELU())
        self.fc2 = nn.Sequential(nn.Linear(cfg.dim, cfg.dim), RMSNorm(cfg.dim), nn.GELU())
        self.clsfer = nn.Linear(cfg.dim, len(EXPERTS))

    def forward(self, x1, x2):
        x = self.fc1(x1).mean(dim=1) + self.fc2(x2).mean(dim=1)
        return self.clsfer(x).softmax(dim=1)


class MoME(nn.Module):
    """One MoME layer: refines x1 with x2 through the expert the router picks for each patient.

    NOTE: routing in an exported graph. The serving graph is one bag (``SingleBag`` adds a batch axis
    of 1), so the route is one scalar per layer, and the layer exports as ``torch.cond`` on it, which
    becomes ONNX ``If`` (TensorRT: conditional layers): the runtime runs the chosen expert only, as
    eager does. Every expert on the bag and a ``where`` selection instead cost per layer up to three
    Nystrom attentions where at most two are needed (each with its fixed-cost m x m pseudo-inverse)
    and made the ONNX Runtime graph about 3x slower than eager. The conds form a chain, not a tree:
    out = x1 (DropX2Fusion), then ``out = cond(e == i, expert_i, keep)`` for i = 0, 1, 2, three
    top-level ``If`` per layer whose untaken branch is one Identity; nested conds (a balanced tree)
    export to the same computation but took twice as long to trace. Each branch returns a fresh
    tensor in x1's shape, dtype and standard strides, as ``torch.cond`` requires.
    A batch of several bags has no scalar route: every expert runs on the batch and each patient's
    output is selected by the router's argmax (a chain of ``where``), exact (a selection, no
    arithmetic on the outputs), so a batch may mix patients routed differently. Eager PyTorch skips
    the experts that no patient of the batch chose (a Python branch on the routing, which a graph
    cannot hold); the selection, and so every number, is the same on every path.
    """

    def __init__(self, cfg: MoMEConfig):
        super().__init__()
        self.TransFusion = TransFusion(cfg)
        self.BottleneckTransFusion = BottleneckTransFusion(cfg)
        self.AddFusion = AddFusion(cfg)
        self.DropX2Fusion = DropX2Fusion()
        self.routing_network = RoutingNetwork(cfg)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> refined x1 (B, T1, D) and the chosen expert per patient (B,) (index into EXPERTS)."""
        choice = self.routing_network(x1, x2).argmax(dim=1)  # (B,), the first maximum, as the reference
        exporting = torch.compiler.is_exporting()
        if exporting and x1.shape[0] == 1:
            return self._one_expert(choice[0], x1, x2), choice
        out = torch.zeros_like(x1)
        for i, name in enumerate(EXPERTS):
            chosen = choice == i  # (B,)
            if exporting or bool(chosen.any()):
                out = torch.where(chosen[:, None, None], getattr(self, name)(x1, x2), out)
        return out, choice

    def _one_expert(self, e: torch.Tensor, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` (a 0-d index) on one bag: DropX2Fusion's x1, replaced by expert i's output in the
        ``torch.cond`` (ONNX ``If``) on e == i for i = 0, 1, 2; only the chosen expert runs."""

        def expert(module):
            # a copy in standard strides: the branches of a cond must return equal strides, and an expert's
            # x1 slice of a longer sequence has a batch stride of its own (an Identity node in ONNX)
            return lambda a, b, kept: module(a, b).clone(memory_format=torch.contiguous_format)

        def keep(a, b, kept):
            return kept.clone()  # a branch may not return one of its inputs

        out = self.DropX2Fusion(x1, x2)
        for i, name in enumerate(EXPERTS[:3]):
            out = torch.cond(e == i, expert(getattr(self, name)), keep, (x1, x2, out))
        return out


class MoMETransformer(SurvivalModel):
    """features (B, N, D), genes (B, G) raw -> logits (B, n_bins); bags of a batch share N.

    ``return_attention`` adds (B, N): the class token's row of the final TransLayer's Nystrom
    attention, attn1 @ pinv(attn2) @ attn3, over the patch tokens, heads averaged. It is computed as a
    (1 x m)(m x m)(m x N) product, O(N * landmarks); the N x N matrix is never formed. Nystrom rows
    are approximate: they need not sum to one and may hold small negative weights.
    """

    REFERENCE = ReferenceFormat(
        repository="BearCleverProud/MoME",
        commit="6c13b31f88616f4e332226c2b192335a2d381a0a",
        model_class="MoMETransformer",
        unused=(r"MoME_\w+\.BottleneckTransFusion\.norm\.weight",),  # built, never called
        not_saved=(r"MoME_\w+\.BottleneckTransFusion\.bottleneck", r"cls_multimodal"),
        note=(
            "the reference makes them with torch.rand at construction, so they exist only in the training "
            "process: rebuild its MoMETransformer with the same arguments right after seed_torch(<the run's "
            "--seed>, default 5) as main.py does before the fold, or load them from the process that trained, "
            "and pass MoMETransformer.extras_from_reference(reference_model) as extra"
        ),
    )

    # torch.export (AOTInductor) cannot yet prove the Nystrom padding guards (N mod landmarks) for a
    # dynamic N; the ONNX exporter can, so MoME is served from model.onnx
    unsupported_artifacts = {
        "torch": "torch.export cannot prove Nystrom attention's padding guards for a dynamic bag size; serve model.onnx"
    }

    def __init__(self, cfg: MoMEConfig, attention_impl: str = "sdpa"):
        super().__init__()
        check_attention_impl(attention_impl)  # no SDPA here: Nystrom attention only
        self.cfg = cfg
        self.genes = GeneScaler(cfg.n_genes)
        self.sig_networks = nn.ModuleList(
            nn.Sequential(snn_block(g, cfg.dim, cfg.dropout), snn_block(cfg.dim, cfg.dim, cfg.dropout))
            for g in cfg.omic_sizes
        )
        self.wsi_net = patch_embedding(cfg.feature_dim, cfg.dim, cfg.dropout)
        for name in LAYERS:
            setattr(self, name, MoME(cfg))
        self.multi_layer1 = TransLayer(cfg)
        self.cls_multimodal = nn.Parameter(torch.rand(1, cfg.dim))  # the reference: torch.rand(...).cuda()
        self.classifier = nn.Linear(cfg.dim, n_outputs(cfg.survival_head, cfg.n_bins))

    def forward(self, features=None, coords=None, genes=None, return_attention: bool = False):
        logits, _, attention = self.route(features, genes, return_attention)
        return (logits, attention) if return_attention else logits

    def route(self, features, genes, return_attention: bool = False):
        """-> logits (B, K), chosen experts (B, 4 layers) as indices into EXPERTS, attention (B, N) or None."""
        path = self.wsi_net(features)  # (B, N, D)
        groups = split_groups(self.genes(genes), self.cfg.omic_sizes)
        omic = torch.stack([net(g) for net, g in zip(self.sig_networks, groups)], dim=1)  # (B, 6, D)
        path, c1 = self.MoME_patho1(path, omic)
        omic, c2 = self.MoME_genom1(omic, path)
        path, c3 = self.MoME_patho2(path, omic)
        omic, c4 = self.MoME_genom2(omic, path)
        cls = self.cls_multimodal.expand(path.shape[0], 1, -1)  # (B, 1, D)
        h = torch.cat([cls, path, omic], dim=1)  # (B, 1 + N + 6, D)
        attention = None
        if return_attention:
            h, row = self.multi_layer1.with_cls_row(h)
            attention = row[:, 1 : 1 + path.shape[1]]  # (B, N): the patch tokens' columns
        else:
            h = self.multi_layer1(h)
        return self.classifier(h[:, 0]), torch.stack([c1, c2, c3, c4], dim=1), attention

    @staticmethod
    def config_from_reference(state: dict) -> dict:
        """Shape-deciding config fields of a reference state_dict (num_landmarks = dim // 2 as the
        reference ties them; the heads count (8) and the survival head cannot be read from shapes)."""
        state = strip_module_prefix(state)
        n_groups = len({k.split(".")[1] for k in state if k.startswith("sig_networks.")})
        sizes = tuple(int(state[f"sig_networks.{i}.0.0.weight"].shape[1]) for i in range(n_groups))
        dim, feature_dim = (int(s) for s in state["wsi_net.0.weight"].shape)
        return dict(
            n_genes=sum(sizes),
            omic_sizes=sizes,
            feature_dim=feature_dim,
            dim=dim,
            num_landmarks=dim // 2,
            n_bottlenecks=2,  # the reference's CLI default; the bottleneck tokens are not in its state_dict
            n_bins=int(state["classifier.weight"].shape[0]),
        )

    @staticmethod
    def extras_from_reference(reference: nn.Module) -> dict[str, torch.Tensor]:
        """The tensors a live reference ``MoMETransformer`` keeps outside its state_dict, by histosurv key."""
        extra = {f"{n}.BottleneckTransFusion.bottleneck": getattr(reference, n).BottleneckTransFusion.bottleneck
                 for n in LAYERS}
        extra["cls_multimodal"] = reference.cls_multimodal
        return {k: v.detach().cpu().clone() for k, v in extra.items()}
