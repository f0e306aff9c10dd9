"""CUDA graphs: the whole DoG step (paired forward + step) captured once per shape, replayed.

sample(cuda_graph=True) runs its loop through run_cuda_graph: one GraphedDoGStep per shape and
settings, whose static buffers (x, t, y, noise, the previous x0, the coefficient row) are
refilled before every replay.
"""
from __future__ import annotations

import torch


GRAPH_MODES = ("ddpm", "ddim", "linear")  # the step_modes the graphed step implements


def guided_step_graphable(x, out_ft, out_guide, noise, c, *, scale: float, k: int, step_mode: str,
                          clip_denoised: bool, prev=None, return_state: bool = False):
    """ops.guided_step_torch (the same body: ops.guided_step_math) with the step's coefficients in a
    device tensor `c` (7,) instead of Python floats: a captured graph then reads each replay's
    values from c (a kernel launched with float arguments would replay the capture step's numbers
    forever).

    step_mode "linear" (DPM-Solver++(2M) and the other multistep rows): out = R x + P x0, + Q eps,
    + T (x0 - prev) when prev is given, + S noise when noise is given; return_state=True returns
    (out, x0), x0 being the next step's prev. A graph is captured with prev / noise buffers in
    place for every step: a step that reads no prev (takes no noise) gets T = 0 (S = 0) in its row
    and a buffer of zeros, and out + 0 * 0 equals out (an exact-zero out may turn -0 into +0,
    equal as values), i.e. guided_step_torch skipping the term.
    """
    from dgfast import ops
    return ops.guided_step_math(x, out_ft, out_guide, noise, c, scale=scale, guidance_channels=k,
                                step_mode=step_mode, clip_denoised=clip_denoised, prev=prev, return_state=return_state)


class GraphedDoGStep:
    """x_next = step(forward(x, t, y, null), x, noise, prev, coefs) as one CUDA graph over static buffers.

    Replays read x, t, y, the step's noise, the previous step's x0 (step_mode "linear") and the
    coefficient row from the buffers, so one capture serves every step of every later call with
    the same shapes and settings. uses_noise / uses_prev: whether the captured step has the noise
    / multistep term at all (ddpm and ddim always take noise and never read prev).
    backend: passed to forward as backend= when not None (a PairedDiT's forward_pair: the fused
    ops' implementation inside the graph, e.g. "torch" when the sampler was asked for it).
    `_capture=False` (tests only) runs the same static-buffer loop eagerly, without CUDA graphs.
    """

    def __init__(self, forward, x_like, y_like, null_label, *, scale, k, step_mode, clip_denoised, warmup=2,
                 uses_noise=True, uses_prev=False, backend=None, _capture=True):
        if step_mode not in GRAPH_MODES:
            raise ValueError(f"step_mode must be one of {GRAPH_MODES}, got {step_mode!r}")
        dev = x_like.device
        linear = step_mode == "linear"
        self.forward, self.guide_label, self.settings = forward, null_label, (scale, k, step_mode, clip_denoised)
        self.forward_kwargs = {} if backend is None else {"backend": backend}
        self.x = torch.zeros_like(x_like)
        self.noise = torch.zeros_like(x_like) if uses_noise or not linear else None
        self.prev = torch.zeros_like(x_like) if linear and uses_prev else None
        self.t = torch.zeros(x_like.shape[0], dtype=torch.int64, device=dev)
        self.y = torch.zeros_like(y_like)
        self.c = torch.ones(7, dtype=torch.float32, device=dev)
        self.graph = None
        if not _capture:
            return
        # Warm up on a side stream: cuBLAS handles, Triton compilation/autotuning, cached tables
        # (timestep frequencies) all happen outside the capture, as torch.cuda.graphs requires.
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                self._step()
        torch.cuda.current_stream(dev).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = self._step()

    def _step(self):
        """(x_next, x0): x0 is the step's data prediction for step_mode "linear", else None."""
        scale, k, step_mode, clip = self.settings
        from dgfast.samplers import model_output
        out_ft, out_guide = self.forward(self.x, self.t, self.y, self.guide_label, **self.forward_kwargs)
        out_ft, out_guide = model_output(out_ft, self.x), model_output(out_guide, self.x)  # in x's dtype
        settings = dict(scale=scale, k=k, step_mode=step_mode, clip_denoised=clip)
        if step_mode != "linear":
            return guided_step_graphable(self.x, out_ft, out_guide, self.noise, self.c, **settings), None
        return guided_step_graphable(self.x, out_ft, out_guide, self.noise, self.c, **settings, prev=self.prev,
                                     return_state=True)

    def run(self, z, y, timesteps, rows, noises, reads_prev=None):
        """Replays over steps 0..S-1: timesteps (S,) int64, rows (S, >=7) float32, noises: S tensors
        or None (a step without noise), reads_prev: S bools, step i reads step i-1's x0 (all on z's
        device). Rows of steps without noise / prev must have S = 0 / T = 0 (run_cuda_graph sees to
        it). Returns a fresh tensor; z is not modified."""
        S = len(noises)
        reads_prev = [False] * S if reads_prev is None else list(reads_prev)
        if (self.noise is None and any(v is not None for v in noises)) or (self.prev is None and any(reads_prev)):
            raise ValueError("this graphed step was built without the noise / prev term the plan needs")
        self.x.copy_(z)
        self.y.copy_(y)
        noise_zero = prev_zero = False                        # buffers known to hold zeros
        for j in range(S):
            self.t.copy_(timesteps[j].expand_as(self.t))     # device-to-device copies only
            self.c.copy_(rows[j, :7])
            if noises[j] is not None:
                self.noise.copy_(noises[j])
                noise_zero = False
            elif self.noise is not None and not noise_zero:
                self.noise.zero_()
                noise_zero = True
            if self.prev is not None and not reads_prev[j] and not prev_zero:
                self.prev.zero_()
                prev_zero = True
            if self.graph is not None:
                self.graph.replay()
            else:
                self.out = self._step()
            x_next, x0 = self.out
            if self.prev is not None and j + 1 < S and reads_prev[j + 1]:
                self.prev.copy_(x0)                           # the multistep state, device to device
                prev_zero = False
            self.x.copy_(x_next)
        return self.x.clone()


def run_cuda_graph(forward, z, y, null_label, plan, draw, *, scale: float, guidance_channels: int,
                   clip_denoised: bool = False, cache: dict | None = None, backend: str | None = None,
                   _capture: bool = True) -> torch.Tensor:
    """The sampling loop with each step replayed from one CUDA graph (sample(cuda_graph=True)).

    forward(x, t, y, null) -> (out_ft, out_guide or None). `plan`: DiT's ddpm/ddim steps (step_modes,
    rows, timesteps, noise flags) or dpm2m's (step_mode "linear", prev flags: the step reads the
    previous step's x0, kept in a static buffer between replays). The noise tensors of the steps
    that take some are drawn up front with draw(), in the loop's order and shapes: the model
    consumes no RNG, so the default generator ends in the same state and every step sees the
    numbers the eager loop would (docs/upstream_sampling.md §4.4).
    `cache`: a dict keeping the captured graph per shape and settings between calls.
    `backend`: forward's backend= (None: forward is called without it; see GraphedDoGStep).
    `_capture=False` (tests only): the same static-buffer loop run eagerly, on any device.
    """
    if _capture and not z.is_cuda:
        raise ValueError("cuda_graph=True needs CUDA tensors")
    modes = set(plan.step_modes)
    S = plan.num_steps
    noise_flags = [bool(v) for v in plan.noise]
    reads = [bool(v) for v in getattr(plan, "prev", [False] * S)]
    reads = [i > 0 and reads[i] for i in range(S)]                     # the eager loop's state is None at step 0
    if (getattr(plan, "scheduler", None) is not None or getattr(plan, "heun", False) or len(modes) != 1
            or not modes <= set(GRAPH_MODES) or getattr(plan, "in_div", None) is not None
            or getattr(plan, "init_sigma", 1.0) != 1.0
            or (not modes <= {"linear"} and (any(reads) or not all(noise_flags)))):
        raise ValueError("cuda_graph=True supports DiT's 'ddpm' and 'ddim' samplers (one noise draw per step) "
                         "and 'dpm2m' (DPM-Solver++(2M), multistep state kept between replays)")
    step_mode = modes.pop()
    clip = getattr(plan, "clip", None)
    clip = bool(clip_denoised) if clip is None else bool(clip)
    noises = [draw() if noise_flags[i] else None for i in range(S)]   # the reference order, up front
    dev = z.device
    timesteps = torch.as_tensor([int(v) for v in plan.timesteps[:S]], dtype=torch.int64, device=dev)
    rows = torch.as_tensor(plan.rows, dtype=torch.float32)[:S, :7].clone()
    if step_mode == "linear":  # the terms a step skips in the eager loop: zero coefficient, zero buffer
        rows[:, 5] = torch.where(torch.tensor(reads), rows[:, 5], 0.0)
        rows[:, 6] = torch.where(torch.tensor(noise_flags), rows[:, 6], 0.0)
    rows = rows.to(dev)
    uses_noise, uses_prev = (any(noise_flags), any(reads)) if step_mode == "linear" else (True, False)
    key = (tuple(z.shape), z.dtype, dev, tuple(y.shape), float(scale), int(guidance_channels), step_mode,
           clip, null_label if not isinstance(null_label, torch.Tensor) else "tensor", uses_noise, uses_prev,
           backend, bool(_capture))
    step = cache.get(key) if cache is not None else None
    if step is None:
        step = GraphedDoGStep(forward, z, y, null_label, scale=float(scale), k=int(guidance_channels),
                              step_mode=step_mode, clip_denoised=clip, uses_noise=uses_noise, uses_prev=uses_prev,
                              backend=backend, _capture=_capture)
        if cache is not None:
            cache[key] = step
    return step.run(z, y, timesteps, rows, noises, reads)
