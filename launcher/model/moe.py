"""Mixture-of-experts models: the router's auxiliary loss over packed rows, the blocks ZeRO-3 gathers whole, and
the parameters one token passes through.

    family = moe_family(model.config)                        # MoE facts of the family, None when dense / unknown
    aux = router_aux(model, cfg.train.router_aux_loss)       # None when no auxiliary loss is added
    loss_fn = aux.wrap(loss_fn) if aux else loss_fn          # returns (loss_sum, n_targets, RouterLoss)
    blocks = moe_blocks(model)                               # class names for DeepSpeed's ZeRO-3 leaf modules

The auxiliary loss (transformers' `load_balancing_loss_func`, the Switch Transformer loss) is, for one forward,

    aux = E * sum_i f_i * P_i,   f_i = C_i / (L n),   P_i = S_i / (L n)

over the n real tokens of the batch and the L MoE layers: C_i counts the top-k picks of expert i, S_i sums
its softmax router probability. transformers computes it inside the model's forward against a 2D padding mask
and crashes on the packed 4D mask, so `prepare` turns the model's own computation off and `RouterAux` records the
router logits with forward hooks (the routers transformers itself records, `_can_record_outputs`), masks
padding out (`token_mask` from `collate(..., token_mask=True)`) and computes the same sum.

What "equal a per-document reference" means here: routing is per token and packed attention is isolated per
document, so a document's router logits packed equal its router logits alone; the loss over a packed batch
equals transformers' own function over the documents run one by one (their router logits concatenated, no
padding). The loss is not a sum over documents (it is a product of two means), so it is defined per forward;
tested in tests/test_moe.py.

Across micro-batches and ranks the loss is token-weighted like the main loss: each micro-batch contributes
`n * aux` (its real tokens times its loss, `RouterLoss.sum`), and `launcher.train.train_step` divides the sum by
the real tokens of the whole step over all ranks and multiplies by the model's own coefficient. With one
micro-batch on one rank this is exactly transformers' `coef * aux_loss`; with equal micro-batches it is their mean
(what the HF Trainer does with gradient accumulation). Under sequence parallelism the counts C and n are summed
over the group (no gradient flows through them) and each rank contributes its own tokens' S, so the group's
terms add up to the loss of the whole rows.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from launcher.model.families import FAMILIES, LOAD_BALANCING, MoE, family_of

log = logging.getLogger(__name__)

# What each MoE family's router does (block class, auxiliary loss, coefficient key) is its row's `moe` in the one
# families table, launcher/model/families.py; this module reads it.
MOE_FAMILIES: dict[str, MoE] = {t: f.moe for f in FAMILIES if f.moe is not None for t in f.model_types}


def _text(config: Any) -> Any:
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def moe_family(config: Any) -> MoE | None:
    """The MoE row of the config's family (a composite config's text model's), None when dense or unknown."""
    family = family_of(config)
    return family.moe if family is not None else None


def moe_blocks(model: torch.nn.Module) -> list[str]:
    """Class names of the model's sparse MoE blocks: every module holding an `experts` submodule (transformers'
    families and the usual remote code alike), so an architecture outside the table is found too."""
    names = {
        type(m).__name__ for m in model.modules() if isinstance(getattr(m, "experts", None), torch.nn.Module)
    }
    return sorted(names)


def separately_called_expert_blocks(model: torch.nn.Module) -> list[str]:
    """MoE blocks whose experts are separate modules (an `nn.ModuleList`), each run only when a token picks it:
    the layout of transformers 4.x and of most remote-code MoE checkpoints. Under ZeRO-3 a rank whose tokens pick
    none of an expert's skips that expert's parameter gather, which the other ranks wait on: training hangs unless
    the block is gathered whole (DeepSpeed's leaf modules, `launcher.engine.gather_whole`). transformers 5 keeps
    the experts of its own families in one module of 3D tensors, gathered whole on every rank whatever the routing.
    """
    names = {
        type(m).__name__
        for m in model.modules()
        if isinstance(getattr(m, "experts", None), torch.nn.ModuleList)
    }
    return sorted(names)


# ---- the router's auxiliary loss ----


def prepare(model: torch.nn.Module) -> None:
    """Keep transformers from computing the auxiliary loss itself (it crashes on packed 4D masks and would count
    padding): the model's `output_router_logits` is recorded as `model.sft_output_router_logits` (the export
    writes it back) and turned off."""
    asked = False
    for c in {id(c): c for c in (model.config, _text(model.config))}.values():
        if getattr(c, "output_router_logits", False):
            asked = True
            c.output_router_logits = False
    model.sft_output_router_logits = asked


@contextlib.contextmanager
def router_logits_restored(model: torch.nn.Module) -> Iterator[None]:
    """The model's config as loaded (`output_router_logits` as its checkpoint had it), e.g. to save it."""
    asked = getattr(model, "sft_output_router_logits", False)
    configs = [c for c in {id(c): c for c in (model.config, _text(model.config))}.values()]
    configs = [c for c in configs if hasattr(c, "output_router_logits")]
    for c in configs:
        c.output_router_logits = asked
    try:
        yield
    finally:
        for c in configs:
            c.output_router_logits = False


class RouterLoss(NamedTuple):
    """A micro-batch's auxiliary term: `sum` = its real tokens x its loss (see the module docstring), `coef` the
    model's own coefficient."""

    sum: torch.Tensor
    coef: float


def router_recorder(model: torch.nn.Module) -> tuple[type, int] | None:
    """(router class, index of its logits in the router's output) as transformers records them for
    `output_router_logits` (`_can_record_outputs["router_logits"]`), or None."""
    for m in model.modules():
        recorder = (getattr(type(m), "_can_record_outputs", None) or {}).get("router_logits")
        if recorder is not None:
            return recorder.target_class, recorder.index
    return None


def load_balancing_sum(
    router_logits: list[torch.Tensor],
    token_mask: torch.Tensor,
    num_experts: int,
    top_k: int,
    group: Any = None,
) -> torch.Tensor:
    """n x transformers' `load_balancing_loss_func` over the real tokens (`token_mask`, [B, T]) of one forward;
    with `group` (a sequence-parallel group), the counts and n are summed over it and this rank's probabilities
    are its share of the group's term."""
    weights = token_mask.reshape(-1).float()
    counts = torch.zeros(num_experts, dtype=torch.float32, device=weights.device)
    probs_sum = torch.zeros(num_experts, dtype=torch.float32, device=weights.device)
    for logits in router_logits:
        logits = logits.reshape(-1, logits.shape[-1])
        assert logits.shape[0] == weights.shape[0], (logits.shape, token_mask.shape)
        probs = torch.softmax(logits.float(), dim=-1)
        picked = torch.topk(probs, top_k, dim=-1).indices  # what transformers counts (softmax is monotone)
        counts.scatter_add_(0, picked.reshape(-1), weights.repeat_interleave(top_k).detach())
        probs_sum = probs_sum + (probs * weights[:, None]).sum(0)
    n = weights.sum().detach().reshape(1)
    if group is not None:
        both = torch.cat([counts.detach(), n])
        dist.all_reduce(both, group=group)
        counts, n = both[:-1], both[-1:]
    layers = len(router_logits)
    return num_experts * (counts.detach() @ probs_sum) / (layers * layers * n.clamp(min=1)).squeeze()


class RouterAux:
    """Records the routers' logits during a forward and turns them into the micro-batch's auxiliary term."""

    def __init__(self, model: torch.nn.Module, group: Any = None) -> None:
        family = moe_family(model.config)
        assert family is not None and family.aux_loss == LOAD_BALANCING, type(model).__name__
        recorder = router_recorder(model)
        assert recorder is not None, f"{type(model).__name__}: no router logits recorded by transformers"
        self.router_cls, self.index = recorder
        text = _text(model.config)
        self.num_experts = _first(text, "num_experts", "num_local_experts", "n_routed_experts")
        self.top_k = text.num_experts_per_tok
        self.coef = float(getattr(text, family.coef_key))
        self.family, self.group = family, group

    @contextlib.contextmanager
    def capture(self, model: Any) -> Iterator[list[torch.Tensor]]:
        """The router logits of every forward run inside (forward hooks, removed on exit, so an activation-
        checkpoint recompute during backward adds nothing)."""
        inner = getattr(model, "module", model)  # a DeepSpeed engine wraps the model
        found: list[torch.Tensor] = []
        hooks = [
            m.register_forward_hook(lambda _m, _i, out: found.append(out[self.index]))
            for m in inner.modules()
            if isinstance(m, self.router_cls)
        ]
        try:
            yield found
        finally:
            for h in hooks:
                h.remove()

    def term(self, router_logits: list[torch.Tensor], batch: dict[str, Any]) -> RouterLoss:
        mask = batch.get("token_mask")
        if mask is None:  # padding-free (varlen) batches hold real tokens only
            assert "cu_seq_lens_q" in batch, (
                "a padded batch needs its token_mask (collate(..., token_mask=True))"
            )
            mask = torch.ones_like(batch["input_ids"], dtype=torch.bool)
        total = load_balancing_sum(router_logits, mask, self.num_experts, self.top_k, self.group)
        return RouterLoss(total, self.coef)

    def wrap(self, loss_fn: Callable) -> Callable:
        """`loss_fn(model, batch) -> (loss_sum, n_targets)` returning also the micro-batch's `RouterLoss`."""

        def with_router_loss(model: Any, batch: dict[str, Any]) -> tuple[Any, Any, RouterLoss]:
            with self.capture(model) as logits:
                loss_sum, n_targets = loss_fn(model, batch)
            return loss_sum, n_targets, self.term(logits, batch)

        return with_router_loss


def _first(config: Any, *keys: str) -> int:
    for key in keys:
        value = getattr(config, key, None)
        if value:
            return int(value)
    raise AssertionError(f"{type(config).__name__} has none of {keys}")


def asks_for_router_logits(config: Any) -> bool:
    """The model's config sets output_router_logits (transformers then adds the auxiliary loss)."""
    return any(getattr(c, "output_router_logits", False) for c in (config, _text(config)))


def router_aux_decision(setting: str, config: Any, asked: bool | None = None) -> tuple[bool, str | None]:
    """Whether `train.router_aux_loss=<setting>` adds the router's auxiliary loss to this model's training loss,
    and the line that says so (None for a model outside the MoE rows that asks for nothing). `auto` adds it when
    the config asks for router logits (`output_router_logits`), as transformers does; `asked` overrides the
    config's own flag (a loaded model's, which `prepare` turned off). ValueError (one line) when a request
    cannot be honoured."""
    setting = str(setting).lower()
    asked = asks_for_router_logits(config) if asked is None else asked
    text = _text(config)
    model_type = getattr(text, "model_type", "this model")
    family = moe_family(config)
    wanted = setting == "true" or (setting == "auto" and asked)
    if family is None:
        if wanted:
            why = (
                "train.router_aux_loss=true"
                if setting == "true"
                else "the model's config sets output_router_logits"
            )
            raise ValueError(
                f"{why}, but {model_type} is not in the MoE rows of `sft models` (launcher/model/families.py), so its router's "
                "auxiliary loss is unknown: set train.router_aux_loss=false to train without it"
            )
        return False, None
    if family.aux_loss is None:
        if setting == "true":
            raise ValueError(
                f"train.router_aux_loss=true, but {model_type} has no router auxiliary loss: {family.note}"
            )
        return False, f"none for {model_type}: {family.note}"
    if not wanted:
        return False, (
            f"off (train.router_aux_loss={setting}"
            + (", and the model's config does not set output_router_logits" if setting == "auto" else "")
            + "): nothing balances the experts"
        )
    coef = float(getattr(text, family.coef_key))
    return True, (
        f"{coef} x load balancing ({family.coef_key}) over the real tokens of each micro-batch, logged as aux_loss"
    )


def router_aux(model: torch.nn.Module, setting: str, group: Any = None) -> RouterAux | None:
    """The auxiliary loss a loaded model trains with for `train.router_aux_loss=<setting>`, or None."""
    add, _ = router_aux_decision(setting, model.config, getattr(model, "sft_output_router_logits", False))
    return RouterAux(model, group) if add else None


# ---- parameters ----


def active_params(model: torch.nn.Module, total: int) -> int:
    """Parameters one token passes through: everything but the routed experts it does not pick (top-k of each
    block's experts; shared experts and dense layers count whole). Works on the meta device."""
    text = _text(model.config)
    top_k = getattr(text, "num_experts_per_tok", None)
    unused = 0
    for m in model.modules():
        experts = getattr(m, "experts", None)
        if not isinstance(experts, torch.nn.Module) or not top_k:
            continue
        if isinstance(experts, torch.nn.ModuleList):
            n, size = len(experts), sum(p.numel() for p in experts.parameters())
        else:  # transformers 5: one module of [num_experts, ...] tensors
            n, size = experts.num_experts, sum(p.numel() for p in experts.parameters())
        unused += size * (n - top_k) // n
    return total - unused
