"""How coding runs the network: the float arithmetic each format version fixes.

Encoder and decoder must compute bit-identical network outputs, so the way the
network runs is part of the format (`versions.Numerics` of each version):

  native (version 1): PyTorch's native convolutions on the whole tile batch at the
      process's thread count (native results do not depend on it; oneDNN's do,
      measured on this machine's 2 cores).
  oneDNN sub-batches (versions 2 to 5): oneDNN convolutions (faster), each call on
      ONE thread and on a fixed sub-batch of tiles (`sub_batch_pixels`); the
      sub-batches run side by side in a thread pool. A single-threaded call on a
      fixed shape computes the same numbers however many workers there are, so
      files decode identically with any thread count.

  exact (version 6): a fixed-point model (`network.fixedpoint`) whose every sum is exact in
      float32, so any kernel, thread count, instruction set, memory layout and batch split
      computes the same integers. For speed only it runs like versions 2 to 5 (4-tile
      sub-batches side by side, one thread each; whole-batch calls at 2 threads and larger
      sub-batches were no faster on 2 cores), with channels-last convolutions
      (`fixedpoint.CODING_LAYOUT`); the portability checks vary the split
      (`VAEZIP_EXACT_SPLIT` tiles per call).

Versions 1 to 5 still depend on the CPU's instruction set (docs/PORTABILITY.md).
`coding_network` sets torch up for one version and hands out a `Network` with the
calls bits-back coding makes: `bottom_up`, `top_down_steps`, `posteriors`, `stage_params`.
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Generic, Iterator, Optional, Sequence, TypeVar

import torch

from vaezip.errors import ModelError
from vaezip.format.versions import Format, Numerics
from vaezip.network.fixedpoint import exact_torch_settings
from vaezip.network.model import Gaussian, HeadAdaptation, HierarchicalVAE, MixtureParams, TopDownSteps

T = TypeVar("T")

ROW_CHUNK = 4096
"""Positions per probability-table chunk (`bitsback`: tables are built and coded chunk by chunk)."""


def chunk_slices(count: int, size: int) -> list[slice]:
    """Consecutive slices of at most `size` covering range(count)."""
    return [slice(start, min(start + size, count)) for start in range(0, count, size)]


def _cat(tensors: Sequence[Optional[torch.Tensor]]) -> Optional[torch.Tensor]:
    if tensors[0] is None:
        return None
    return tensors[0] if len(tensors) == 1 else torch.cat(list(tensors))


class Network:
    """The network calls of bits-back coding, run under one version's numerics.

    Same signatures as `HierarchicalVAE.bottom_up`, `top_down_steps`, `posteriors` and
    `stage_params`; outputs are whole-batch tensors whatever the sub-batching.
    """

    def __init__(self, model: HierarchicalVAE, numerics: Numerics, pool: Optional[ThreadPoolExecutor],
                 adaptation: Optional[HeadAdaptation] = None):
        self.model = model
        self.numerics = numerics
        self.adaptation = adaptation
        self._pool = pool

    def adapted(self, adaptation: Optional[HeadAdaptation]) -> "Network":
        """This network (same numerics and threads) with the stage heads changed by
        `adaptation` (format version 5, `vaezip.coding.adapt`); None: the model as shipped."""
        return Network(self.model, self.numerics, self._pool, adaptation)

    def _slices(self, batch: int, pixels_per_item: int) -> list[slice]:
        if self.numerics.exact and exact_split():
            return chunk_slices(batch, exact_split())
        size = self.numerics.sub_batch_pixels
        if size is None:
            return [slice(0, batch)]
        return chunk_slices(batch, max(1, size // pixels_per_item))

    def _map(self, fn: Callable, *iterables) -> list:
        """fn over the sub-batches, in the pool's threads (each in inference mode)."""
        call = _in_inference_mode(fn)
        if self._pool is None or len(iterables[0]) == 1:
            return [call(*args) for args in zip(*iterables)]
        return list(self._pool.map(call, *iterables))

    def _start(self, fn: Callable, *iterables) -> Callable[[], list]:
        """`_map` started now: fn over the sub-batches, each a `later` job ("network"), even a
        single one, so the caller's own work overlaps it; returns the call that waits for
        the results."""
        call = _in_inference_mode(fn)
        jobs = [self.later(functools.partial(call, *args), kind="network") for args in zip(*iterables)]
        return lambda: [job.result() for job in jobs]

    def map_threads(self, fn: Callable, items: Sequence) -> list:
        """[fn(item) for item in items], side by side in the pool's threads, with autograd
        on (the encoder's fits, `adapt.fit`); each call runs on one torch thread, so its
        result does not depend on the worker count."""
        def call(item):
            with torch.inference_mode(False), torch.enable_grad():
                return fn(item)

        if self._pool is None:
            return [call(item) for item in items]
        return list(self._pool.map(call, items))

    def later(self, build: Callable[[], T], kind: str = "tables") -> "Later[T]":
        """build() started in the pool now (numpy releases the GIL): tables built while the
        caller codes earlier ones, or ("network") the encoder's pixel steps run ahead. Without
        a pool it runs when its result is asked for."""
        return Later(build, self._pool, kind)

    def bottom_up(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        slices = self._slices(x.shape[0], x.shape[-2] * x.shape[-1])
        parts = self._map(self.model.bottom_up, [x[s] for s in slices])
        return {factor: _cat([p[factor] for p in parts]) for factor in parts[0]}

    def top_down_steps(self, batch: int, height: int, width: int, acts: Optional[dict[int, torch.Tensor]] = None,
                       states: Optional[list] = None) -> TopDownSteps:
        """`HierarchicalVAE.top_down_steps` on the whole batch: the sub-batches walk the groups
        in lockstep; each step yields (g, prior, posterior) of the whole batch and is sent its z.

        `states`, if a list, gets one list of recorded (h, prior) per sub-batch, for `posteriors`.
        """
        slices = self._slices(batch, height * width)
        if states is not None:
            states.extend([] for _ in slices)
        walks = [
            self.model.top_down_steps(s.stop - s.start, height, width,
                                      None if acts is None else {f: a[s] for f, a in acts.items()},
                                      None if states is None else states[i])
            for i, s in enumerate(slices)
        ]
        requests = self._map(_step, walks, [None] * len(walks))
        while not isinstance(requests[0], _Done):
            g = requests[0][0]
            prior = Gaussian(_cat([r[1].mean for r in requests]), _cat([r[1].log_std for r in requests]))
            posterior = None
            if requests[0][2] is not None:
                posterior = Gaussian(_cat([r[2].mean for r in requests]), _cat([r[2].log_std for r in requests]))
            z = yield g, prior, posterior
            requests = self._map(_step, walks, [z[s] for s in slices])
        return _cat([r.features for r in requests])

    def posteriors(self, states: list, acts: dict[int, torch.Tensor], height: int, width: int) -> list[Gaussian]:
        """`HierarchicalVAE.posteriors` on the sub-batches `top_down` recorded `states` for."""
        batch = next(iter(acts.values())).shape[0]
        slices = self._slices(batch, height * width)
        parts = self._map(lambda s, st: self.model.posteriors(st, {f: a[s] for f, a in acts.items()}), slices, states)
        return [Gaussian(_cat([p[g].mean for p in parts]), _cat([p[g].log_std for p in parts]))
                for g in range(len(parts[0]))]

    def stage_raw(self, features: torch.Tensor, lattice: torch.Tensor, stage: int,
                  available: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`HierarchicalVAE.stage_raw` on the whole batch (no adaptation): what `adapt.fit` fits."""
        slices = self._slices(features.shape[0], 4 * features.shape[-2] * features.shape[-1])
        return _cat(self._map(lambda s: self.model.stage_raw(features[s], lattice[s], stage, _part(available, s)),
                              slices))

    def stage_params(self, features: torch.Tensor, lattice: torch.Tensor, stage: int,
                     available: Optional[torch.Tensor] = None) -> MixtureParams:
        """`HierarchicalVAE.stage_params` on the whole batch, with this network's adaptation."""
        slices = self._slices(features.shape[0], 4 * features.shape[-2] * features.shape[-1])
        return _cat_params(self._map(lambda s: self.model.stage_params(features[s], lattice[s], stage,
                                                                       self.adaptation, _part(available, s)), slices))

    def step_params(self, features: torch.Tensor, lattice: torch.Tensor, step: int,
                    available: Optional[torch.Tensor] = None) -> MixtureParams:
        """`HierarchicalVAE.step_params` on the whole batch, with this network's adaptation;
        `lattice` with the ring and `available` for a `pixel_halo` model (`bitsback.TileRing`)."""
        return _cat_params(self._map(*self._step_calls(features, lattice, step, available)))

    def step_params_started(self, features: torch.Tensor, lattice: torch.Tensor, step: int,
                            available: Optional[torch.Tensor] = None) -> Callable[[], MixtureParams]:
        """`step_params` started in the pool now; returns the call that waits for it (the
        encoder, which knows every step's input, runs a batch's steps ahead of its coding).
        The inputs must not change until it has returned."""
        wait = self._start(*self._step_calls(features, lattice, step, available))
        return lambda: _cat_params(wait())

    def _step_calls(self, features: torch.Tensor, lattice: torch.Tensor, step: int,
                    available: Optional[torch.Tensor]) -> tuple[Callable, list[slice]]:
        """`step_params` as one call per sub-batch, and the sub-batches."""
        slices = self._slices(features.shape[0], 4 * features.shape[-2] * features.shape[-1])
        return (lambda s: self.model.step_params(features[s], lattice[s], step, self.adaptation, _part(available, s)),
                slices)


class Later(Generic[T]):
    """A result being computed in a thread pool, or without one, computed when asked for;
    `kind` says what it is ("tables", "network"), for profiles."""

    def __init__(self, build: Callable[[], T], pool: Optional[ThreadPoolExecutor], kind: str = "tables"):
        self._build, self.kind = build, kind
        self._future = None if pool is None else pool.submit(build)

    def result(self) -> T:
        return self._build() if self._future is None else self._future.result()

    def cancel(self) -> None:
        """Drop the work if it has not started (what was started finishes unused)."""
        if self._future is not None:
            self._future.cancel()


def _in_inference_mode(fn: Callable) -> Callable:
    def call(*args):
        with torch.inference_mode():
            return fn(*args)

    return call


def _part(t: Optional[torch.Tensor], rows: slice) -> Optional[torch.Tensor]:
    return None if t is None else t[rows]


def _cat_params(parts: list[MixtureParams]) -> MixtureParams:
    """Sub-batches' mixture parameters as one batch."""
    return MixtureParams(
        logits=_cat([p.logits for p in parts]), means=_cat([p.means for p in parts]),
        log_scales=_cat([p.log_scales for p in parts]), coeffs=_cat([p.coeffs for p in parts]),
    )


@dataclass
class _Done:
    features: torch.Tensor


def _step(walk, z: Optional[torch.Tensor]):
    """Advance a `top_down_steps` walk: its next request, or `_Done` with the features."""
    try:
        return next(walk) if z is None else walk.send(z)
    except StopIteration as done:
        return _Done(done.value)


def exact_split() -> Optional[int]:
    """Tiles per network call under exact numerics, from VAEZIP_EXACT_SPLIT (None: the whole
    batch). Any value gives the same numbers; the portability checks vary it to show that."""
    value = os.environ.get("VAEZIP_EXACT_SPLIT")
    return int(value) if value and value.isdigit() and int(value) > 0 else None


def default_workers() -> int:
    """Threads for sub-batched numerics: torch's intra-op thread count (OMP_NUM_THREADS or the cores)."""
    return max(1, torch.get_num_threads() or os.cpu_count() or 1)


@contextmanager
def coding_network(model: HierarchicalVAE, fmt: Format, workers: Optional[int] = None) -> Iterator[Network]:
    """Torch set up for coding with format `fmt`'s numerics; restored afterwards.

    Changes process-wide torch settings (oneDNN on or off, and for sub-batches one
    intra-op thread) while it is open: do not run other torch work in parallel
    threads meanwhile.
    """
    numerics = fmt.numerics
    if numerics.exact != model.fixed:
        kind = "a fixed-point" if numerics.exact else "a float"
        raise ModelError(f"format version {fmt.version} codes with {kind} model; this one is not")
    if model.config.stage0_levels and not fmt.stage0_steps:
        raise ModelError(f"format version {fmt.version} codes stage 0 in one step; this model splits it "
                         f"(stage0_levels {model.config.stage0_levels}), which a fixed-point model codes "
                         "in version 7")
    if model.config.pixel_halo and not fmt.pixel_halo:
        raise ModelError(f"format version {fmt.version} codes tiles without the ring around them; this model "
                         "reads it (pixel_halo), which version 8 codes")
    if numerics.exact:
        exact_torch_settings()
    previous = torch.backends.mkldnn.enabled, torch.get_num_threads()
    workers = workers or default_workers()
    torch.backends.mkldnn.enabled = numerics.onednn
    pool = None
    if numerics.sub_batch_pixels is not None:
        torch.set_num_threads(1)
        pool = ThreadPoolExecutor(workers) if workers > 1 else None
    try:
        with torch.inference_mode():
            yield Network(model, numerics, pool)
    finally:
        if pool is not None:
            pool.shutdown()
        torch.backends.mkldnn.enabled, threads = previous
        torch.set_num_threads(threads)
