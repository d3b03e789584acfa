"""SparseMaskedAdamW: torch.optim.AdamW restricted to a chosen set of coordinates, with compact state.

State per masked parameter (k = number of selected coordinates):
    indices     sorted unique flat indices [k], int32 when numel < 2**31 else int64; None when every coordinate
                of the parameter is selected (then no index tensor is stored at all)
    exp_avg     float32 [k]
    exp_avg_sq  float32 [k]
    master      float32 [k], bf16/fp16 parameters with master weights only (created at the first step)
    swallowed   int64 0-dim, bf16/fp16 parameters only: updates that rounding would have swallowed without masters
    step        float32 0-dim CPU tensor, as torch.optim.AdamW keeps it
Parameters absent from `masks` are updated densely by torch's own AdamW (foreach or fused), with torch's state.

FSDP2 (`fully_shard`, parameters sharded as DTensors by rows over a 1-D mesh, or HSDP's 2-D mesh that shards
over one dimension and replicates over the other): masks are given for the full parameter and each rank keeps the
indices and state of its own rows only, shard-local (indices address the local shard's storage).
`full_state_dict()` / `load_full_state_dict()` convert to and from the state one process would hold (global
indices), so checkpoints load on any world size.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch.optim.adam import adam as _torch_adam
from torch.optim.optimizer import _get_scalar_dtype

from fastopd import _dispatch
from fastopd.distributed.data_parallel import is_dtensor, local_shard, shard_like
from fastopd.optim.masks import to_indices

OP = "sparse_adamw_step"
_LOW_PRECISION = (torch.bfloat16, torch.float16)
_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)


def _index_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel < 2**31 else torch.int64


def _shard_dim(p: torch.Tensor) -> int:
    """The mesh dimension over which a DTensor parameter is row-sharded: FSDP2's Shard(0) on a 1-D mesh (dim 0), or
    HSDP's (Replicate(), Shard(0)) on a 2-D mesh (dim 1); every other mesh dimension must replicate it."""
    from torch.distributed.tensor import Replicate, Shard

    placements = tuple(p.placements)
    sharded = [d for d, pl in enumerate(placements) if pl == Shard(0)]
    if len(sharded) != 1 or any(pl != Replicate() for d, pl in enumerate(placements) if d != sharded[0]):
        raise ValueError(f"SparseMaskedAdamW shards masks by rows over one mesh dimension (Shard(0), the others "
                         f"Replicate(): FSDP2 or HSDP), got mesh {tuple(p.device_mesh.shape)} with placements "
                         f"{placements}")
    return sharded[0]


def _shard_span(p: torch.Tensor) -> tuple[int, int]:
    """(first global flat index, flat size) of this rank's shard of a row-sharded DTensor parameter."""
    mesh, dim = p.device_mesh, _shard_dim(p)
    rows = p.shape[0]
    chunk = -(-rows // mesh.size(dim))  # torch.chunk's split, as FSDP2 shards
    first = min(rows, mesh.get_local_rank(dim) * chunk)
    local = local_shard(p)
    if local.shape[0] != max(0, min(chunk, rows - first)):
        raise ValueError(f"unexpected shard of {tuple(p.shape)}: local {tuple(local.shape)} at row {first}")
    row_numel = local[0].numel() if local.shape[0] else 0
    return first * (p.numel() // rows if rows else 0), local.shape[0] * row_numel


def masks_digest(masks: Mapping[str, torch.Tensor | None]) -> str:
    """SHA-256 over the names, shapes, dtypes and values of a dict of masks (or index tensors; None = all):
    equal digests on every rank of a data-parallel job mean identical masks."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(masks):
        m = masks[name]
        h.update(f"{name}:{None if m is None else (tuple(m.shape), str(m.dtype))}:".encode())
        if m is not None:
            h.update(m.detach().to("cpu", copy=True).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _prefix_hint(unknown: list[str], known: Iterable[str]) -> str:
    """For masks whose names are all one dotted prefix away from the parameters' (a torch.compile'd model's
    "_orig_mod.", DDP's "module."), where strict=False would ignore every one of them: how to rename them."""
    from fastopd.analysis.masks import prefix_renamings

    fits = prefix_renamings(unknown, set(known))
    if len(fits) != 1:
        return ""
    prefix, removed, _ = fits[0]
    return (f"; they are the parameters' names with the prefix {prefix!r} {'added' if removed else 'removed'} (a "
            "torch.compile'd model names its parameters '_orig_mod.<name>'): rename them with "
            "fastopd.analysis.match_param_names(masks, [name for name, _ in model.named_parameters()]) "
            "(strict=False would ignore them all and train those parameters densely)")


def _first_difference(saved: list[str] | None, names: list[str] | None) -> str:
    """Where two lists of parameter names first differ, for an error message ("" without names)."""
    if saved is None or names is None:
        return ""
    i = next((i for i, (a, b) in enumerate(zip(saved, names)) if a != b), min(len(saved), len(names)))
    a = repr(saved[i]) if i < len(saved) else "nothing"
    b = repr(names[i]) if i < len(names) else "nothing"
    return f"; the names first differ at position {i}: {a} in the state dict, {b} here"


@torch.compiler.disable
def _dense_adamw(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                 exp_avg_sqs: list[torch.Tensor], steps: list[torch.Tensor], **options: Any) -> None:
    """torch's own AdamW on the parameters without a mask. Eager under torch.compile: traced from this step rather
    than from torch.optim.AdamW.step (which dynamo special-cases), its bias corrections become fake scalar tensors
    that the foreach kernels refuse ("Expected scalars to be on CPU"), so a compiled step raised."""
    _torch_adam(params, grads, exp_avgs, exp_avg_sqs, [], steps, **options)


class SparseMaskedAdamW(torch.optim.Optimizer):
    """AdamW that updates only the masked coordinates of each parameter and keeps state only for them.

    Args:
        params: `model.named_parameters()` (name, tensor) pairs, or param-group dicts whose "params" are such
            pairs (param groups work as in torch.optim; groups may override lr, betas, eps, weight_decay).
            Unnamed tensors are accepted but can only be updated densely. A tensor given twice in a group (a tied
            weight under both names), or one name given to two tensors, raises.
        masks: parameter name -> bool tensor of the parameter's shape, or 1-D integer tensor of flat indices
            (unsorted indices are sorted; duplicates or out-of-range indices raise), or None for every coordinate
            (as `mask_indices()` returns it). A parameter absent from the dict is updated densely; an empty mask
            (no coordinate selected) freezes it.
        lr, betas, eps, weight_decay: as torch.optim.AdamW (decoupled weight decay, applied only to the
            selected coordinates of masked parameters).
        master_weights: "auto" or True keeps fp32 master copies of the selected values of bf16/fp16
            parameters; False updates them from their stored values (small updates may round away; see
            `rounding_report()`). float32 parameters never need masters.
        impl: backend of the sparse step, "auto" | "torch" | "cpu" | "triton" ("auto": C++ on CPU tensors,
            Triton on CUDA tensors, else torch). FASTOPD_IMPL overrides "auto".
        foreach, fused: passed to torch's AdamW for the dense parameters (default: foreach).
        strict: with False, masks naming parameters this optimizer does not hold (tied weights, buffers from a
            state-dict diff) are ignored instead of raising.

    Raises:
        ValueError: a tensor given twice, a name given to two tensors, unknown mask names, masks whose shape does
            not match the parameter, non-integer/non-bool masks, out-of-range or duplicated indices, unsupported
            dtypes, invalid hyper-parameters.
    """

    def __init__(
        self,
        params: Iterable[Any],
        masks: Mapping[str, torch.Tensor | None] | None = None,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        master_weights: bool | str = "auto",
        impl: str = "auto",
        foreach: bool | None = None,
        fused: bool | None = None,
        strict: bool = True,
    ) -> None:
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"Invalid betas: {betas}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if master_weights not in ("auto", True, False):
            raise ValueError(f"master_weights must be 'auto', True or False, got {master_weights!r}")
        impls = ("auto", *_dispatch.backend_names(OP))
        if impl not in impls:
            raise ValueError(f"impl must be one of {impls} for SparseMaskedAdamW, got {impl!r}")
        if fused and foreach:
            raise ValueError("foreach and fused cannot both be True")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.master_weights = master_weights
        self.impl = impl
        self.foreach = foreach
        self.fused = fused
        self._names: dict[int, str] = {}
        for gi, group in enumerate(self.param_groups):
            self._register_names(gi, group)
        self._reference: dict[int, torch.Tensor] = {}

        masks = dict(masks or {})
        by_name = {self._names[id(p)]: p for group in self.param_groups for p in group["params"]}
        unknown = sorted(set(masks) - set(by_name))
        if unknown and not strict:
            masks = {n: m for n, m in masks.items() if n in by_name}
        elif unknown:
            unnamed = all("param_names" not in g for g in self.param_groups)
            raise ValueError(f"masks name parameters that are not optimized here: {unknown[:8]}"
                             f"{' ...' if len(unknown) > 8 else ''} (known: {sorted(by_name)[:8]} ...)"
                             + ("; the parameters were given without names: pass model.named_parameters() or "
                                "param groups of (name, tensor) pairs (Hugging Face Trainer's "
                                "optimizer_cls_and_kwargs passes bare tensors: build the optimizer from named "
                                "groups and pass Trainer(optimizers=(optimizer, None)))" if unnamed else
                                _prefix_hint(unknown, by_name) or
                                "; strict=False ignores names of tensors not given here (e.g. a tied weight's "
                                "second name, which model.named_parameters() leaves out)"))
        for name, mask in masks.items():
            p = by_name[name]
            if p.dtype not in _SUPPORTED:
                raise ValueError(f"masked parameter {name!r} has dtype {p.dtype}; supported: {_SUPPORTED}")
            if not local_shard(p).is_contiguous():
                raise ValueError(f"masked parameter {name!r} (shape {tuple(p.shape)}) must be contiguous: "
                                 "mask indices address its row-major storage")
            # int64 sorted unique, or None for all selected (as `mask_indices()` gives it back)
            idx = None if mask is None else to_indices(mask, p.shape, name=name)
            if idx is not None and is_dtensor(p):  # keep this shard's coordinates, shard-local
                first, size = _shard_span(p)
                idx = idx.to(p.device)
                idx = idx[(idx >= first) & (idx < first + size)] - first
            numel = local_shard(p).numel()
            idx = None if idx is None else idx.to(device=p.device, dtype=_index_dtype(numel))
            self.state[p] = self._fresh_masked_state(p, idx)

    # ------------------------------------------------------------------ helpers
    def _register_names(self, gi: int, group: dict[str, Any]) -> None:
        names = group.get("param_names")
        for pi, p in enumerate(group["params"]):
            self._names[id(p)] = names[pi] if names is not None else f"group{gi}.param{pi}"

    @staticmethod
    def _check_group_options(group: Mapping[str, Any], where: str) -> None:
        """Refuses torch.optim.Adam(W) options this optimizer does not implement, which it would otherwise ignore
        (a group dict, or a torch checkpoint's groups)."""
        for key in ("amsgrad", "maximize"):
            if group.get(key):
                raise ValueError(f"{where}: {key}=True is not implemented by SparseMaskedAdamW (plain AdamW)")
        if group.get("decoupled_weight_decay") is False and group.get("weight_decay", 0) != 0:
            raise ValueError(f"{where}: weight_decay={group['weight_decay']} with decoupled_weight_decay=False "
                             "(torch.optim.Adam's L2 penalty) is not SparseMaskedAdamW's decoupled (AdamW) decay")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As torch.optim.Optimizer.add_param_group; parameters added later are updated densely. Raises ValueError
        for options it does not implement (amsgrad, maximize, coupled weight decay) and for a tensor given twice in
        the group (torch.optim only warns, then updates it twice per step)."""
        self._check_group_options(param_group, "param group")
        params = param_group.get("params")
        if params is not None and not isinstance(params, (torch.Tensor, set)):  # torch refuses sets itself
            # A tensor given twice (a tied weight under both of its names) would be stepped twice per step (torch
            # only warns), and its masks, keyed by either name, would silently replace each other.
            param_group["params"] = params = list(params)
            seen: dict[int, str] = {}
            # Masks, mask_indices() and export_delta() go by name: one name for two tensors (groups made from the
            # named_parameters() of two submodules, both "weight") would mask one of them and train the other
            # densely. torch.optim's Optimizer.__init__ sets param_groups before adding the first group.
            gi = len(self.param_groups)
            taken = {n: g for g, group in enumerate(self.param_groups) for n in group.get("param_names", ())}
            for i, item in enumerate(params):
                name, tensor = item if isinstance(item, tuple) else (f"param{i}", item)
                if not isinstance(tensor, torch.Tensor):
                    continue  # torch names the problem
                if id(tensor) in seen:
                    raise ValueError(f"parameter {name!r} is the tensor already given as {seen[id(tensor)]!r} "
                                     "(tied weights?): pass each tensor once, as model.named_parameters() does, "
                                     "and key its mask by that name")
                if isinstance(item, tuple) and name in taken:
                    raise ValueError(f"the name {name!r} is given to a tensor in param group {taken[name]} and to "
                                     f"another in param group {gi}: masks are looked up by name, so names must be "
                                     "unique (take them from the whole model's named_parameters(), not from each "
                                     "submodule's)")
                seen[id(tensor)] = name
                if isinstance(item, tuple):
                    taken[name] = gi
        super().add_param_group(param_group)
        if hasattr(self, "_names"):
            self._register_names(len(self.param_groups) - 1, self.param_groups[-1])

    def _is_masked(self, p: torch.Tensor) -> bool:
        return "indices" in self.state.get(p, {})

    def _wants_master(self, p: torch.Tensor) -> bool:
        return p.dtype in _LOW_PRECISION and self.master_weights in ("auto", True)

    @staticmethod
    def _gather(p: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
        flat = local_shard(p).detach().view(-1)
        return flat.clone() if idx is None else flat.index_select(0, idx)

    @staticmethod
    def _fresh_masked_state(p: torch.Tensor, idx: torch.Tensor | None) -> dict[str, Any]:
        k = local_shard(p).numel() if idx is None else idx.numel()
        state: dict[str, Any] = {
            "step": torch.tensor(0.0, dtype=_get_scalar_dtype()),
            "indices": idx,
            "exp_avg": torch.zeros(k, dtype=torch.float32, device=p.device),
            "exp_avg_sq": torch.zeros(k, dtype=torch.float32, device=p.device),
        }
        if p.dtype in _LOW_PRECISION:
            state["swallowed"] = torch.zeros((), dtype=torch.int64, device=p.device)
        return state

    def _compact_dense_state(self, p: torch.Tensor, dense: dict[str, Any]) -> dict[str, Any]:
        """The dense AdamW state of `p` restricted to its current mask (moments gathered, in float32)."""
        st = self._fresh_masked_state(p, self.state[p]["indices"])
        idx = st["indices"]
        for key in ("exp_avg", "exp_avg_sq"):
            if key in dense:
                v = local_shard(dense[key])
                if v.numel() != local_shard(p).numel():
                    raise ValueError(f"state of {self._names[id(p)]!r}: dense {key} has {v.numel()} values for a "
                                     f"parameter of {p.numel()}")
                st[key] = self._gather(v, idx).float()
        if "step" in dense:
            st["step"] = dense["step"].detach().to("cpu", _get_scalar_dtype(), copy=True)
        return st

    def _check_masked_state(self, p: torch.Tensor, st: dict[str, Any]) -> None:
        name = self._names[id(p)]
        if p.dtype not in _SUPPORTED or not local_shard(p).is_contiguous():
            raise ValueError(f"state of {name!r} holds a mask, but the parameter (dtype {p.dtype}, contiguous: "
                             f"{local_shard(p).is_contiguous()}) cannot be masked: masked parameters are contiguous "
                             f"and of dtype {_SUPPORTED}")
        idx = st["indices"]
        numel = local_shard(p).numel()
        k = numel if idx is None else idx.numel()
        for s in ("exp_avg", "exp_avg_sq", "master"):
            if s in st and st[s].numel() != k:
                raise ValueError(f"state of {name!r}: {s} has {st[s].numel()} values for a mask of {k}")
        if idx is not None and k and (int(idx.max()) >= numel or int(idx.min()) < 0):
            raise ValueError(f"state of {name!r}: mask indices out of range for numel {numel}")
        if idx is not None and k > 1 and not bool((idx[1:] > idx[:-1]).all()):
            # the kernels' parallel chunks rely on it: a repeated index would be updated twice, racing
            raise ValueError(f"state of {name!r}: mask indices must be sorted and unique")

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One AdamW step on every parameter with a gradient (masked ones on their selected coordinates)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # The sparse kernel's backend for every device and every group's checks, before any group steps: a refused
        # step changes nothing (a later group's refused gradient would otherwise leave the earlier groups stepped).
        backends = {device: _dispatch.resolve(OP, self.impl, device)
                    for device in {p.device for g in self.param_groups for p in g["params"]
                                   if p.grad is not None and "indices" in self.state[p]}}
        plans = [self._plan_group(group) for group in self.param_groups]
        for group, plan in zip(self.param_groups, plans):
            self._step_group(group, plan, backends)
        return loss

    def _plan_group(self, group: dict[str, Any]) -> tuple[dict[str, list], dict[torch.device, dict[str, list]],
                                                          list[dict[str, Any]]]:
        """The group's parameters with a gradient, checked and sorted into (dense, sparse by device, frozen); moves
        no step count, moment or parameter."""
        dense: dict[str, list] = {k: [] for k in ("p", "g", "m", "v", "t")}
        sparse: dict[torch.device, dict[str, list]] = {}
        frozen: list[dict[str, Any]] = []
        for p in group["params"]:
            if p.grad is None:
                continue
            grad = p.grad
            if grad.is_sparse:
                raise RuntimeError("SparseMaskedAdamW does not support sparse gradients")
            state = self.state[p]
            if "indices" not in state:
                if len(state) == 0:
                    on_device = bool(self.fused)
                    state["step"] = (torch.zeros((), dtype=_get_scalar_dtype(is_fused=self.fused), device=p.device)
                                     if on_device else torch.tensor(0.0, dtype=_get_scalar_dtype()))
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                dense["p"].append(p)
                dense["g"].append(grad)
                dense["m"].append(state["exp_avg"])
                dense["v"].append(state["exp_avg_sq"])
                dense["t"].append(state["step"])
                continue
            idx = state["indices"]
            grad = local_shard(grad)
            if grad.shape != local_shard(p).shape or grad.dtype != p.dtype:
                raise ValueError(f"gradient of {self._names[id(p)]!r} has shape {tuple(grad.shape)} and dtype "
                                 f"{grad.dtype}; expected {tuple(p.shape)} and {p.dtype}")
            if self._wants_master(p) and "master" not in state:
                state["master"] = self._gather(p, idx).float()
            if idx is not None and idx.numel() == 0:
                # Nothing selected here (a frozen parameter, or an FSDP2 shard holding none of its parameter's
                # selection): nothing to update, but the step count (and the empty master) go with the other
                # shards', so every rank's state is the one-process state and any rank's checkpoint resumes it.
                frozen.append(state)
                continue
            bucket = sparse.setdefault(p.device, {k: [] for k in ("o", "p", "g", "i", "m", "v", "w", "s", "st")})
            bucket["o"].append(p)
            bucket["p"].append(local_shard(p))
            bucket["g"].append(grad if grad.is_contiguous() else grad.contiguous())
            bucket["i"].append(idx)
            bucket["m"].append(state["exp_avg"])
            bucket["v"].append(state["exp_avg_sq"])
            bucket["w"].append(state.get("master"))
            bucket["s"].append(state.get("swallowed"))
            bucket["st"].append(state)
        return dense, sparse, frozen

    def _step_group(self, group: dict[str, Any], plan: tuple[dict[str, list], dict[torch.device, dict[str, list]],
                                                            list[dict[str, Any]]],
                    backends: dict[torch.device, str]) -> None:
        # Every check came before the first step count moves (`step` planned every group and resolved the backends).
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        dense, sparse, frozen = plan
        for state in frozen:
            state["step"] += 1
        for device, b in sparse.items():
            step_sizes, bc2_sqrts = [], []
            for state in b["st"]:
                state["step"] += 1
                t = state["step"].item()  # a CPU tensor, as in torch.optim.AdamW: no device synchronization
                step_sizes.append(lr / (1 - beta1**t))
                bc2_sqrts.append((1 - beta2**t) ** 0.5)
            _dispatch.kernel(OP, backends[device])(b["p"], b["g"], b["i"], b["m"], b["v"], b["w"], b["s"], step_sizes,
                                                   bc2_sqrts, float(lr), float(beta1), float(beta2), float(eps),
                                                   float(wd))
            # The C++ and Triton kernels write through data pointers, which autograd cannot see: bump the version
            # counters as a native in-place op would, so a graph that saved a parameter before this step raises
            # instead of silently back-propagating through the new values.
            torch.autograd.graph.increment_version(
                b["o"] + [t for t, o in zip(b["p"], b["o"]) if t is not o]  # a DTensor's local shard too
                + b["m"] + b["v"] + [t for t in b["w"] + b["s"] if t is not None])
        if dense["p"]:
            has_complex = any(torch.is_complex(p) for p in dense["p"])
            foreach = self.foreach
            if foreach is None and not self.fused:
                # foreach by default, but not for a Tensor lr, as torch.optim.AdamW decides: its foreach step
                # refuses one without capturable
                foreach = not isinstance(lr, torch.Tensor)
            _dense_adamw(dense["p"], dense["g"], dense["m"], dense["v"], dense["t"], foreach=foreach,
                         fused=self.fused, capturable=False, differentiable=False, grad_scale=None, found_inf=None,
                         has_complex=has_complex, decoupled_weight_decay=True, amsgrad=False, beta1=beta1, beta2=beta2,
                         lr=lr, weight_decay=wd, eps=eps, maximize=False)

    # ------------------------------------------------------------------ state dict
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads state (masks included) saved by `state_dict()`. Tensors keep their dtypes (fp32 moments stay
        fp32 for bf16 parameters, also when a dense checkpoint's are gathered onto a mask) and move to their
        parameter's device; the checkpoint's masks replace the constructor's. The reference point of
        `export_delta` is dropped (call `mark_reference()` again). Raises ValueError when groups, sizes or names
        do not match."""
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"state dict has {len(saved_groups)} parameter groups, optimizer has "
                             f"{len(self.param_groups)}")
        id_map: dict[int, torch.Tensor] = {}
        for gi, saved in enumerate(saved_groups):
            self._check_group_options(saved, f"state dict parameter group {gi}")
        for gi, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            saved_names, names = saved.get("param_names"), group.get("param_names")
            if len(saved["params"]) != len(group["params"]) or (
                    saved_names is not None and names is not None and saved_names != names):
                sizes = (f"has {len(saved['params'])} parameters, the optimizer's has {len(group['params'])}"
                         if len(saved["params"]) != len(group["params"]) else "does not match the optimizer's")
                raise ValueError(f"parameter group {gi} of the state dict {sizes}"
                                 + _first_difference(saved_names, names))
            id_map.update(zip(saved["params"], group["params"]))

        new_state: dict[torch.Tensor, dict[str, Any]] = {}
        for key, saved_state in state_dict["state"].items():
            if key not in id_map:
                continue
            p = id_map[key]
            masked = "indices" in saved_state
            st: dict[str, Any] = {}
            for k, v in saved_state.items():
                if not isinstance(v, torch.Tensor):
                    st[k] = v
                elif k == "step":  # masked steps stay on the CPU; dense ones follow torch's policy
                    on_device = not masked and (v.device.type != "cpu" or bool(self.fused))
                    st[k] = v.detach().to(device=p.device if on_device else "cpu", copy=True)
                elif k in ("exp_avg", "exp_avg_sq") and not masked and not self._is_masked(p):
                    st[k] = v.detach().to(device=p.device, dtype=p.dtype, copy=True)  # dense onto dense: torch's rule
                else:
                    st[k] = v.detach().to(device=p.device, copy=True)
            if not masked and self._is_masked(p):
                st = self._compact_dense_state(p, st)  # a dense (e.g. torch AdamW) checkpoint onto this mask
            elif not masked:  # else the next step fails in torch's AdamW on "the size of tensor a"
                for k in ("exp_avg", "exp_avg_sq"):
                    if k in st and tuple(st[k].shape) != tuple(p.shape):
                        raise ValueError(f"state of {self._names[id(p)]!r}: {k} has shape {tuple(st[k].shape)}, "
                                         f"the parameter has {tuple(p.shape)}")
            if "indices" in st:
                self._check_masked_state(p, st)
                # The state follows this optimizer's parameter dtype and master_weights, not the saving run's: a
                # master would override an fp32 parameter's own values (or a bf16 one's under master_weights=False)
                # at every step, and a bf16/fp16 parameter counts swallowed updates.
                if not self._wants_master(p):
                    st.pop("master", None)
                if p.dtype in _LOW_PRECISION:
                    st.setdefault("swallowed", torch.zeros((), dtype=torch.int64, device=p.device))
                else:
                    st.pop("swallowed", None)
            new_state[p] = st
        for group in self.param_groups:
            for p in group["params"]:
                if p not in new_state and self._is_masked(p):  # no saved state: keep the mask, fresh moments
                    new_state[p] = self._fresh_masked_state(p, self.state[p]["indices"])
        self.state.clear()
        self.state.update(new_state)
        self._reference = {}  # taken at other values (and maybe another mask): export_delta returns all again
        for group, saved in zip(self.param_groups, saved_groups):
            for k, v in saved.items():
                if k not in ("params", "param_names"):
                    group[k] = copy.deepcopy(v)  # as torch.optim does: a Tensor lr is updated in place by schedulers
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    # ------------------------------------------------------------------ inspection and export
    def _named_params(self) -> list[tuple[str, torch.Tensor]]:
        return [(self._names[id(p)], p) for group in self.param_groups for p in group["params"]]

    def mask_indices(self) -> dict[str, torch.Tensor | None]:
        """name -> the selected flat indices of each masked parameter (None: every coordinate)."""
        return {n: self.state[p]["indices"] for n, p in self._named_params() if self._is_masked(p)}

    def masks_digest(self) -> str:
        """`masks_digest` of this optimizer's selected indices: equal on every rank of a DDP job with identical
        masks (compare with `torch.distributed.all_gather_object`). Under FSDP2 the indices are shard-local."""
        return masks_digest(self.mask_indices())

    # ------------------------------------------------------------------ FSDP2: world-size-independent state
    def full_state_dict(self) -> dict[str, Any]:
        """`state_dict()` as one process would hold it: for sharded (DTensor) parameters the masked state of every
        shard is gathered with global flat indices, and dense moments are gathered to full tensors. A collective
        over each parameter's mesh: every rank calls it. Equal to `state_dict()` without DTensor parameters."""
        import torch.distributed as dist

        sd = self.state_dict()
        params = [p for group in self.param_groups for p in group["params"]]
        state = {}
        for i, st in sd["state"].items():
            p = params[i]
            if not is_dtensor(p):
                state[i] = st
            elif "indices" not in st:
                state[i] = {k: (v.full_tensor() if is_dtensor(v) else v) for k, v in st.items()}
            else:
                first, size = _shard_span(p)
                idx = st["indices"]
                mine = {"indices": (torch.arange(size) if idx is None else idx.to("cpu", torch.int64)) + first,
                        "all": idx is None}
                for k in ("exp_avg", "exp_avg_sq", "master", "swallowed"):
                    if k in st:
                        mine[k] = st[k].to("cpu")
                dim = _shard_dim(p)  # gathered over the shard dimension; HSDP replicas each hold the same
                parts: list = [None] * p.device_mesh.size(dim)
                dist.all_gather_object(parts, mine, group=p.device_mesh.get_group(dim))
                full = dict(st)
                full["indices"] = (None if all(q["all"] for q in parts) else
                                   torch.cat([q["indices"] for q in parts]).to(p.device, _index_dtype(p.numel())))
                for k in ("exp_avg", "exp_avg_sq", "master"):
                    if k in st:
                        full[k] = torch.cat([q[k] for q in parts]).to(p.device)
                if "swallowed" in st:
                    full["swallowed"] = sum(q["swallowed"] for q in parts).to(p.device)
                state[i] = full
        return {"state": state, "param_groups": sd["param_groups"]}

    def load_full_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a `full_state_dict()` (or a one-process `state_dict()`), saved on any world size: each sharded
        parameter keeps its rows' part, with shard-local indices."""
        params = [p for group in self.param_groups for p in group["params"]]
        state = {}
        for i, st in state_dict["state"].items():
            p = params[i] if i < len(params) else None
            if p is None or not is_dtensor(p):
                state[i] = st
            elif "indices" not in st:
                state[i] = {k: (shard_like(v, p) if isinstance(v, torch.Tensor) and tuple(v.shape) == tuple(p.shape)
                                else v)
                            for k, v in st.items()}
            else:
                first, size = _shard_span(p)
                idx = st["indices"]
                gidx = torch.arange(p.numel(), device=p.device) if idx is None else idx.to(p.device, torch.int64)
                keep = (gidx >= first) & (gidx < first + size)
                local = dict(st)
                local["indices"] = None if idx is None else (gidx[keep] - first).to(_index_dtype(size))
                for k in ("exp_avg", "exp_avg_sq", "master"):
                    if k in st:
                        local[k] = st[k].to(p.device)[keep]
                if "swallowed" in st:  # the count is a run total: kept on the shard dimension's first rank
                    first_rank = p.device_mesh.get_local_rank(_shard_dim(p)) == 0
                    local["swallowed"] = st["swallowed"] if first_rank else torch.zeros_like(st["swallowed"])
                state[i] = local
        self.load_state_dict({"state": state, "param_groups": state_dict["param_groups"]})

    def rounding_report(self) -> dict[str, int]:
        """name -> number of coordinate updates (summed over steps) of each bf16/fp16 masked parameter that
        rounding to the parameter's dtype would have swallowed without master weights. Synchronizes."""
        return {n: int(self.state[p]["swallowed"]) for n, p in self._named_params()
                if self._is_masked(p) and "swallowed" in self.state[p]}

    def state_bytes(self) -> int:
        """Bytes held in optimizer state tensors (indices, moments, masters, counters, steps)."""
        total = 0
        for st in self.state.values():
            for v in st.values():
                if isinstance(v, torch.Tensor):
                    total += v.numel() * v.element_size()
        return total

    def mark_reference(self) -> None:
        """Records the current values of every coordinate the optimizer may change (the masked coordinates of
        masked parameters, all coordinates of dense ones) as the reference point of `export_delta`."""
        self._reference = {}
        for _, p in self._named_params():
            idx = self.state[p]["indices"] if self._is_masked(p) else None
            self._reference[id(p)] = self._gather(p, idx)

    @torch.no_grad()
    def export_delta(self, reset: bool = True) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """name -> (indices int64 [n], values [n] in the parameter's dtype): the coordinates whose value changed
        since the reference point (`mark_reference()`), with their current values; writing them into a copy of
        the weights at the reference point reproduces the current weights. Without a reference point every
        coordinate the optimizer may have changed is returned. With `reset`, the current values become the new
        reference point. Under FSDP2, of this rank's shard, with shard-local indices. Synchronizes (the number of
        changed coordinates is data-dependent)."""
        out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name, p in self._named_params():
            idx = self.state[p]["indices"] if self._is_masked(p) else None
            current = self._gather(p, idx)
            all_idx = (torch.arange(local_shard(p).numel(), device=p.device) if idx is None else idx.long())
            ref = self._reference.get(id(p))
            if ref is None:
                out[name] = (all_idx, current)
            else:
                changed = current != ref
                out[name] = (all_idx[changed], current[changed])
            if reset:
                self._reference[id(p)] = current
        return out
