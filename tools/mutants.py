"""The mutants of `make mutate` (tools/mutate.py) and the tests that cover each source file.

A mutant is one small, realistic bug: ``original`` (found exactly once in ``path``) replaced by ``replacement``.
When a mutant survives, add a test that kills it; never weaken the mutant. tests/test_mutants.py checks in CI that
every mutant still applies, so a refactor that moves the code shows up here instead of silently testing nothing.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str
    original: str
    replacement: str
    bug: str  # the bug it models, in a few words


# pytest arguments that cover each mutated file: tight selections, run with -x -m "not slow".
COVERING_TESTS = {
    "crepa_kernels/spec.py": ["tests/test_reference.py", "tests/test_api.py", "tests/test_tiny_eps.py"],
    "crepa_kernels/reference.py": ["tests/test_reference.py"],
    # the launch-configuration and guard tests first (seconds), then the kernels under the interpreter (minutes)
    "crepa_kernels/ops/triton_loss.py": [
        "tests/test_backend_selection.py::test_triton_runs_its_shifted_tiling_on_every_checked_arch",
        "tests/test_backend_selection.py::test_triton_reads_the_capability_once_per_device",
        "tests/test_triton_compile.py::test_shifted_tiling_compiles_without_spills_below_sm_90",
        "tests/test_triton_guards.py",
        "tests/test_tiny_eps.py",
        "tests/test_triton_backend.py"],
    "csrc/crepa_cpu.cpp": ["tests/test_cpu_backend.py"],
    "csrc/crepa_math.h": ["tests/test_tiny_eps.py", "tests/test_cpu_backend.py"],
    "crepa_kernels/training/token_grid.py": ["tests/test_training.py", "-k", "temporal or spatial or token_grid"],
    "crepa_kernels/training/regularizer.py": ["tests/test_training.py", "tests/test_training_features.py", "-k",
                                              "regularizer or layers or mask"],
    "crepa_kernels/training/weighting.py": ["tests/test_training_features.py", "-k", "weight or mask or reduction"],
    "crepa_kernels/training/schedule.py": ["tests/test_schedule.py"],
    "crepa_kernels/training/encoders.py": ["tests/test_encoders.py"],
    "crepa_kernels/distributed/layout.py": ["tests/test_distributed_plan.py"],
    "crepa_kernels/distributed/collectives.py": ["tests/test_distributed_plan.py", "tests/test_distributed.py"],
    "crepa_kernels/backends.py": ["tests/test_api.py", "tests/test_backend_selection.py"],
    "crepa_kernels/ops/extension.py": ["tests/test_cuda_limits.py", "tests/test_backend_selection.py"],
    "crepa_kernels/distributed/training.py": ["tests/test_distributed_training.py", "-k", "shard_sizes"],
    "crepa_kernels/gpu_limits.py": ["tests/test_cuda_limits.py", "tests/test_gpu_limits.py"],
    "csrc/crepa_cuda_plan.h": ["tests/test_cuda_limits.py"],
    "crepa_kernels/training/capture.py": ["tests/test_training.py", "-k", "capture or checkpoint or hook"],
    "crepa_kernels/training/projector.py": ["tests/test_training.py", "-k", "projector"],
    "crepa_kernels/function.py": ["tests/test_function.py", "tests/test_porting.py"],
    "crepa_kernels/reference_backend.py": ["tests/test_function.py", "tests/test_reference.py"],
    "crepa_kernels/training/feature_cache.py": ["tests/test_feature_cache.py"],
}

SPEC = "crepa_kernels/spec.py"
EXTENSION = "crepa_kernels/ops/extension.py"
REFERENCE = "crepa_kernels/reference.py"
TRITON = "crepa_kernels/ops/triton_loss.py"
CPU = "csrc/crepa_cpu.cpp"
MATH = "csrc/crepa_math.h"
TOKEN_GRID = "crepa_kernels/training/token_grid.py"
REGULARIZER = "crepa_kernels/training/regularizer.py"
CAPTURE = "crepa_kernels/training/capture.py"
PROJECTOR = "crepa_kernels/training/projector.py"
WEIGHTING = "crepa_kernels/training/weighting.py"
SCHEDULE = "crepa_kernels/training/schedule.py"
ENCODERS = "crepa_kernels/training/encoders.py"
LAYOUT = "crepa_kernels/distributed/layout.py"
COLLECTIVES = "crepa_kernels/distributed/collectives.py"
BACKENDS = "crepa_kernels/backends.py"
DIST_TRAINING = "crepa_kernels/distributed/training.py"
GPU_LIMITS = "crepa_kernels/gpu_limits.py"
CUDA_PLAN = "csrc/crepa_cuda_plan.h"
FUNCTION = "crepa_kernels/function.py"
REFERENCE_BACKWARD = "crepa_kernels/reference_backend.py"
FEATURE_CACHE = "crepa_kernels/training/feature_cache.py"

MUTANTS = [
    # --- spec.py: options, neighbour structure, layouts -------------------------------------------------------
    Mutant("spec-adjacent-d0", SPEC, 'return (-d, d) if 0 < d < num_frames else ()',
           'return (-d, d) if 0 <= d < num_frames else ()', "d = 0 counts the frame itself twice"),
    Mutant("spec-cumulative-range", SPEC, 'tuple(range(1, d + 1))', 'tuple(range(1, d))',
           "cumulative mode stops one offset short"),
    Mutant("spec-weight-sign", SPEC, 'return math.e ** (-abs(offset) / self.tau)',
           'return math.e ** (-offset / self.tau)', "weight of a negative offset without abs"),
    Mutant("spec-z-without-self", SPEC, 'z = sum(row) if self.normalize_weights else 1.0',
           'z = sum(row) - row[f] if self.normalize_weights else 1.0', "Z_f without the frame's own weight"),
    Mutant("spec-eps-zero-allowed", SPEC, 'if not _is_positive_finite(options.eps):',
           'if not (options.eps >= 0 and options.eps < math.inf):', "eps = 0 accepted"),
    Mutant("spec-token-major", SPEC, 'frames = x.unflatten(1, (num_frames, x.shape[1] // num_frames))',
           'frames = x.unflatten(1, (x.shape[1] // num_frames, num_frames)).transpose(1, 2)',
           "3-D input read token-major instead of frame-major"),
    Mutant("spec-fp64-needs-both", SPEC, 'if proj.dtype == torch.float64 or target.dtype == torch.float64:',
           'if proj.dtype == torch.float64 and target.dtype == torch.float64:', "fp64 only when both are fp64"),
    Mutant("spec-frame-sum-axis", SPEC, 'return per_frame.sum(dim=1).mean()', 'return per_frame.sum(dim=0).mean()',
           "frame_sum sums over the batch"),
    # --- reference.py: the specification ------------------------------------------------------------------------
    Mutant("reference-eps-ignored", REFERENCE, 'p_hat, y_hat = p / clamped_norm(p, options.eps), y / clamped_norm(y, options.eps)',
           'p_hat, y_hat = p / clamped_norm(p, 1e-12), y / clamped_norm(y, options.eps)', "eps option ignored for proj"),
    Mutant("reference-eps-added", REFERENCE, 'return torch.where(norm > eps, norm, torch.ones_like(norm) * eps)',
           'return norm + eps', "eps added to the norm instead of clamping it"),
    Mutant("reference-kink-unclamped", REFERENCE, 'return torch.where(norm > eps, norm, torch.ones_like(norm) * eps)',
           'return torch.where(norm >= eps, norm, torch.ones_like(norm) * eps)',
           "a norm of exactly eps treated as unclamped (the radial gradient term kept)"),
    Mutant("reference-unweighted-neighbour", REFERENCE,
           'similarity = similarity + F.pad(options.weight(offset) * neighbour, (first, num_frames - last))',
           'similarity = similarity + F.pad(neighbour, (first, num_frames - last))', "neighbour term without its weight"),
    Mutant("reference-z-counts", REFERENCE, 'dtype=dtype, device=device) * options.weight(offset)',
           'dtype=dtype, device=device) * 1.0', "Z_f counts neighbours instead of weighing them"),
    Mutant("reference-pad-swapped", REFERENCE,
           'similarity = similarity + F.pad(options.weight(offset) * neighbour, (first, num_frames - last))',
           'similarity = similarity + F.pad(options.weight(offset) * neighbour, (num_frames - last, first))',
           "neighbour term lands on the wrong frames"),
    Mutant("reference-normalize-inverted", REFERENCE, 'if options.normalize_weights:',
           'if not options.normalize_weights:', "normalize_weights inverted"),
    # --- Triton kernels ---------------------------------------------------------------------------------------
    Mutant("triton-forward-write-mask", TRITON,
           'writes = row_ok & (rows >= first_row) & (rows < first_row + rows_per_tile)\n        out_ok',
           'writes = row_ok & (rows >= first_row) & (rows <= first_row + rows_per_tile)\n        out_ok',
           "forward tile also writes its neighbour tile's first row (a race on a GPU)"),
    Mutant("triton-backward-write-mask", TRITON,
           'writes = row_ok & (rows >= first_row) & (rows < first_row + rows_per_tile)\n        write_ok',
           'writes = row_ok & (rows >= first_row) & (rows <= first_row + rows_per_tile)\n        write_ok',
           "backward tile also writes its neighbour tile's first row (a race on a GPU)"),
    Mutant("triton-split-proj-lo", TRITON,
           'grad_p = _dot_split(a_hi, a_lo, y)',
           'grad_p = tl.dot(a_hi, y, out_dtype=tl.float32)', "bf16 split drops a_lo (grad proj)"),
    Mutant("triton-split-target-lo", TRITON,
           'grad_y = _dot_split(a_t_hi, a_t_lo, p)',
           'grad_y = tl.dot(a_t_hi, p, out_dtype=tl.float32)', "bf16 split drops a_lo (grad target)"),
    Mutant("triton-radial-term-clamped", TRITON, 'p_scale = tl.where(p_norm > eps,',
           'p_scale = tl.where(p_norm >= eps,', "radial gradient term kept for clamped norms"),
    Mutant("triton-neighbour-distance", TRITON, '((distance >= near) & (distance <= far))) & inside',
           '((distance > near) & (distance <= far))) & inside', "nearest neighbour distance dropped"),
    Mutant("triton-z-edge", TRITON, 'z += tl.where(i - distance >= 0, w, 0.0)',
           'z += tl.where(i - distance > 0, w, 0.0)', "Z_f misses the neighbour at frame 0"),
    Mutant("triton-norm-plus-eps", TRITON, 'p_norm = tl.maximum(_sqrt(p_squares, COMPUTE), eps)',
           'p_norm = _sqrt(p_squares, COMPUTE) + eps', "eps added to |p| instead of clamping it"),
    Mutant("triton-tau-fp32", TRITON, 'inv_tau = 1.0 / tl.load(tau_ptr)',
           'inv_tau = 1.0 / tl.load(tau_ptr).to(tl.float32)', "the neighbour weights use tau rounded to fp32"),
    Mutant("triton-eps-fp32", TRITON, "eps = tl.load(eps_ptr).to(COMPUTE)  # fp64 on the device (scalar_tensor)\n"
           "        batch, token_block, tile = _work_item(num_batches, num_token_blocks, num_tiles)\n"
           "        first_row = tile * rows_per_tile\n        window",
           "eps = tl.load(eps_ptr).to(tl.float32).to(COMPUTE)\n"
           "        batch, token_block, tile = _work_item(num_batches, num_token_blocks, num_tiles)\n"
           "        first_row = tile * rows_per_tile\n        window",
           "the fp64 forward clamps the norms with eps rounded to fp32"),
    Mutant("triton-compiled-scalars-filled", TRITON, 'return one * options.tau, one * options.eps',
           'return scalar_tensor(options.tau, like), scalar_tensor(options.eps, like)',
           "torch.compile specialises tau and eps: one graph per value"),
    Mutant("triton-buffers-is-contiguous", TRITON, 'buffer.stride() != _contiguous_strides(shapes[name])',
           'not buffer.is_contiguous()', "torch.compile guards on one token block: N = 5 after N <= 4 recompiles"),
    Mutant("triton-window-by-power", TRITON, 'while frames < num_frames:', 'while frames <= num_frames:',
           "F = 16 takes a 32-frame window: torch.compile guards F < 16, so F = 16 recompiles"),
    Mutant("triton-halo-z", TRITON, 'for distance in range(near, z_far + 1):',
           'for distance in range(near, z_far):',
           "Z_f misses the farthest neighbour"),
    # --- CPU kernel ---------------------------------------------------------------------------------------------
    Mutant("cpu-partial-per-thread", CPU,
           '  for (int64_t begin, end; queue.take(begin, end);) {\n'
           '    for (int64_t block = begin; block < end; ++block) {\n'
           '      const int64_t b = block / a.blocks;\n'
           '      const int64_t first = (block % a.blocks) * kTokensPerBlock;\n'
           '      const int64_t last = std::min(a.tokens, first + kTokensPerBlock);\n'
           '      acc_t* block_sum = a.partials + block * F;\n'
           '      for (int64_t f = 0; f < F; ++f) block_sum[f] = acc_t(0);',
           '  int64_t home = -1;  // the first block this thread took of the current batch item\n'
           '  for (int64_t begin, end; queue.take(begin, end);) {\n'
           '    for (int64_t block = begin; block < end; ++block) {\n'
           '      const int64_t b = block / a.blocks;\n'
           '      const int64_t first = (block % a.blocks) * kTokensPerBlock;\n'
           '      const int64_t last = std::min(a.tokens, first + kTokensPerBlock);\n'
           '      for (int64_t f = 0; f < F; ++f) a.partials[block * F + f] = acc_t(0);\n'
           '      if (home < b * a.blocks) home = block;\n'
           '      acc_t* block_sum = a.partials + home * F;',
           "one running loss sum per thread: the result depends on which thread takes which block"),
    Mutant("cpu-mean-over-padded-tokens", CPU, 'out[b * F + f] = static_cast<acc_t>(-sum / static_cast<double>(N));',
           'out[b * F + f] = static_cast<acc_t>(-sum / static_cast<double>(blocks * kTokensPerBlock));',
           "token mean over whole blocks"),
    Mutant("cpu-dot-tail", CPU, 'for (int64_t l = 0; l < n - body; ++l) {',
           'for (int64_t l = 0; l + 1 < n - body; ++l) {', "vector dot drops the last tail element"),
    Mutant("cpu-strided-read", CPU, 'for (int64_t i = 0; i < d; ++i) row[i] = widen<acc_t>(source[i * d_stride]);',
           'for (int64_t i = 0; i < d; ++i) row[i] = widen<acc_t>(source[i]);', "strided D read as contiguous"),
    # --- the maths shared by the CPU and CUDA kernels ------------------------------------------------------------
    Mutant("math-live-at-eps", MATH, 'return raw_norm > eps;', 'return raw_norm >= eps;',
           "radial term kept for a norm exactly equal to eps (autograd of clamp_min drops it)"),
    Mutant("math-clamp-adds-eps", MATH, 'return raw_norm > eps ? raw_norm : eps;', 'return raw_norm + eps;',
           "eps added to the norm instead of clamping it"),
    Mutant("math-cumulative-offset", MATH, 'return slot <= reach ? slot - reach - 1 : slot - reach;',
           'return slot < reach ? slot - reach - 1 : slot - reach;', "cumulative slot offsets shifted"),
    Mutant("math-z-out-of-range", MATH, 'if (band.lands(frame, s)) weight_sum += neighbour_weight(band.offset(s), tau);',
           'weight_sum += neighbour_weight(band.offset(s), tau);', "Z_f counts neighbours outside [0, F)"),
    Mutant("math-weight-times-tau", MATH, 'return exp_of(-distance / tau);', 'return exp_of(-distance * tau);',
           "weight exp(-d tau)"),
    Mutant("math-target-self-norm", MATH, 'return alpha_cos / (ny * ny);', 'return alpha_cos / ny;',
           "radial term of grad y divided by |y| once"),
    # --- training helpers -------------------------------------------------------------------------------------
    Mutant("token-grid-patch-first-frame", TOKEN_GRID,
           'return groups.mean(dim=2) if mode == "mean" else groups[:, :, -1]',
           'return groups.mean(dim=2) if mode == "mean" else groups[:, :, 0]',
           "temporal patch subsampling takes the first frame"),
    Mutant("token-grid-vae-first-frame", TOKEN_GRID,
           'pooled = groups.mean(dim=2) if mode == "mean" else groups[:, :, -1]',
           'pooled = groups.mean(dim=2) if mode == "mean" else groups[:, :, 0]',
           "VAE-group subsampling takes the first frame"),
    Mutant("token-grid-align-corners", TOKEN_GRID, 'mode="bilinear", align_corners=False',
           'mode="bilinear", align_corners=True', "corner-aligned instead of half-pixel resampling"),
    Mutant("token-grid-latent-count", TOKEN_GRID, 'return (num_pixel_frames - 1) // temporal_ratio + 1',
           'return num_pixel_frames // temporal_ratio + 1', "latent frame count without the causal first frame"),
    Mutant("regularizer-unweighted", REGULARIZER, 'loss=weight * align_loss,', 'loss=align_loss,',
           "lambda not applied"),
    Mutant("regularizer-figure-ignores-mask", REGULARIZER,
           '(neighbour_terms * included).sum() / (included * neighbour_weight).sum())',
           'neighbour_terms.sum() / (included * neighbour_weight).sum())',
           "neighbour similarity counts masked frames"),
    Mutant("capture-rearmed-in-backward", CAPTURE, 'if _inside_backward():\n            return\n        self._states',
           'if False:\n            return\n        self._states', "recomputation in backward overwrites the capture"),
    Mutant("capture-keeps-last-call", CAPTURE, '        self._armed[position] = False\n        self._states[position]',
           '        self._states[position]', "every call of the block overwrites the capture"),
    Mutant("projector-no-first-activation", PROJECTOR, 'if i > 0:', 'if i > 1:',
           "no SiLU after the first Linear"),
    # --- backend selection ------------------------------------------------------------------------------------
    Mutant("backends-env-overrides-named", BACKENDS, 'if backend == "auto" and override:', 'if override:',
           "CREPA_KERNELS_BACKEND overrides an explicitly named backend"),
    # --- training: schedule, weights and masks, encoders ---------------------------------------------------------
    Mutant("schedule-warmup-from-zero", SCHEDULE, 'return self.weight * (step + 1) / self.warmup_steps',
           'return self.weight * step / self.warmup_steps', "warm-up starts at lambda = 0"),
    Mutant("schedule-ema-swapped", SCHEDULE,
           'self.similarity_ema = decay * self.similarity_ema + (1 - decay) * mean',
           'self.similarity_ema = (1 - decay) * self.similarity_ema + decay * mean', "EMA weights swapped"),
    Mutant("schedule-cutoff-late", SCHEDULE, 'if self.cutoff_step is not None and step >= self.cutoff_step:',
           'if self.cutoff_step is not None and step > self.cutoff_step:', "cutoff one step late"),
    Mutant("weighting-renormalised", WEIGHTING, 'return weighted.sum() / included.sum().clamp(min=1)',
           'return weighted.sum() / scale.sum().clamp(min=1e-12)', "mean divides by the sum of weights"),
    Mutant("weighting-frame-sum-empty-videos", WEIGHTING, 'videos = (included.sum(dim=1) > 0).sum().clamp(min=1)',
           'videos = (included.sum(dim=1) >= 0).sum().clamp(min=1)', "frame_sum counts fully masked videos"),
    Mutant("encoder-registers-kept", ENCODERS, 'return 1 + getattr(self.model.config, "num_register_tokens", 0)',
           'return 1', "register tokens taken as patch tokens"),
    Mutant("encoder-subsample-group-end", ENCODERS, 'return frames[:, ::self.temporal_ratio]',
           'return frames[:, self.temporal_ratio - 1::self.temporal_ratio]',
           "subsampled frames off by one against the causal first frame"),
    # --- distributed sequence-parallel loss ---------------------------------------------------------------------
    Mutant("layout-exact-past-end", LAYOUT, 'all(piece.first_frame <= k < piece.end_frame for k in',
           'all(piece.first_frame <= k <= piece.end_frame for k in',
           "a frame whose neighbour lies just past the piece counted as exact"),
    Mutant("layout-padding-counted", LAYOUT, 'return start, min(start + self.shard_sizes[rank], self.seq_len)',
           'return start, start + self.shard_sizes[rank]', "padding tokens treated as real"),
    Mutant("layout-term-reads-whole-frame", LAYOUT,
           'last = (term.end_frame - 1 + term.offset) * n + piece.end_token',
           'last = (term.end_frame - 1 + term.offset) * n + n', "halo reads the rest of the last frame"),
    Mutant("collectives-replicated-grad-local", COLLECTIVES,
           'return funcol.wait_tensor(funcol.all_reduce(grad.contiguous(), "sum", ctx.group_name)), None',
           'return grad, None', "a replicated target keeps only this rank's gradient"),
    Mutant("dist-training-shard-sizes", DIST_TRAINING, 'return [base + (rank < extra) for rank in range(world_size)]',
           'return [base + (rank <= extra) for rank in range(world_size)]', "one rank too many gets an extra token"),
    # --- GPU launch planning, checked without a GPU -------------------------------------------------------------
    Mutant("triton-work-item-order", TRITON, 'return rest // num_tiles, token_block, rest % num_tiles',
           'return rest % num_tiles, token_block, rest // num_tiles', "flat work item decoded with batch and tile swapped"),
    Mutant("triton-shifted-config-never", TRITON, 'and capability < SHIFTED_PIPELINED_CAPABILITY:',
           'and capability < MIN_CAPABILITY:', "shifted kernels below sm_90 keep sm_90's spilling config"),
    Mutant("triton-shifted-config-on-sm90", TRITON, 'and capability < SHIFTED_PIPELINED_CAPABILITY:',
           'and capability <= SHIFTED_PIPELINED_CAPABILITY:', "sm_90 loses its pipelined config"),
    Mutant("triton-launch-ignores-target-arch", TRITON,
           '_forward_setup(proj, target, options, capability or device_capability(proj.device))',
           '_forward_setup(proj, target, options, device_capability(proj.device))',
           "the ahead-of-time check compiles sm_90's forward for every architecture"),
    Mutant("triton-capability-cached-for-current-device", TRITON,
           'if device.index is None else _cached_capability(device)', 'if False else _cached_capability(device)',
           "torch.device('cuda') cached though the current device can change"),
    Mutant("cuda-plan-backward-smem", CUDA_PLAN,
           'saturating_sum(table, saturating_product(2, saturating_sum(F, W)))',
           'saturating_sum(table, saturating_product(2, F))', "backward shared memory misses the band slots"),
    Mutant("gpu-limits-sm86-smem", GPU_LIMITS, '"sm_86": 99 * KB,', '"sm_86": 163 * KB,',
           "RTX 3090 / A6000 credited with A100 shared memory"),
    # --- the autograd Function, the reference's hand-written backward, the feature cache ------------------------
    Mutant("function-mean-grad-per-batch", FUNCTION, 'return grad_loss.expand(batch, frames) / (batch * frames)',
           'return grad_loss.expand(batch, frames) / batch', "mean reduction's gradient not divided by the frames"),
    Mutant("function-clamp-off-by-one", FUNCTION, 'options = LossOptions(tau=tau, neighbors=num_frames - 1,',
           'options = LossOptions(tau=tau, neighbors=num_frames - 2,', "SimpleTuner's clamp one frame short"),
    Mutant("function-needs-grad-swapped", FUNCTION, 'needs_proj_grad, needs_target_grad = ctx.needs_input_grad[:2]',
           'needs_target_grad, needs_proj_grad = ctx.needs_input_grad[:2]', "the gradient asked for is not the one computed"),
    Mutant("function-apply-trusts-missing-statistics", FUNCTION,
           'if not saved and backend.BACKWARD_READS_STATISTICS:', 'if False:',
           "apply's backward runs without the statistics it did not keep"),
    Mutant("function-keeping-form-recomputes", FUNCTION,
           'if not saved and backend.BACKWARD_READS_STATISTICS:', 'if backend.BACKWARD_READS_STATISTICS:',
           "the functional form pays a second forward for statistics it kept"),
    Mutant("function-reference-recomputes", FUNCTION,
           'if not saved and backend.BACKWARD_READS_STATISTICS:', 'if not saved:',
           "the reference backend runs its whole forward again for nothing"),
    Mutant("refbwd-no-radial-term", REFERENCE_BACKWARD,
           'projected = u - unit * (unit * u).sum(dim=-1, keepdim=True)', 'projected = u',
           "normalisation's Jacobian without its radial term"),
    Mutant("refbwd-transpose-direction", REFERENCE_BACKWARD,
           'out[:, first + offset:last + offset] += w * (per_frame[:, first:last] * x[:, first:last])',
           'out[:, first:last] += w * (per_frame[:, first:last] * x[:, first + offset:last + offset])',
           "target gradient gathered instead of scattered over neighbours"),
    Mutant("refbwd-clamped-branch", REFERENCE_BACKWARD, 'return torch.where(clamped > eps, projected, u) / clamped',
           'return torch.where(clamped > eps, projected, u / clamped) / clamped', "clamped norms divided twice"),
    Mutant("cache-entry-fingerprint-unchecked", FEATURE_CACHE, 'if metadata.get("fingerprint") != self.fingerprint:',
           'if False:', "a stale entry served as current"),
    Mutant("cache-not-atomic", FEATURE_CACHE, 'write(str(temporary))', 'write(str(path)); return',
           "entries written in place: a crash leaves a partial one"),
    # --- issue 20, defects 3 and 4: size limits under torch.compile; a tiny eps -----------------------------------
    Mutant("i20-traced-sizes-unchecked", BACKENDS,
           'if not within_size_limits(limits, proj.shape[1], proj.shape[3]):', 'if False:',
           "under torch.compile auto ignores the sizes a backend refuses"),
    Mutant("i20-size-step-exclusive", BACKENDS, 'if max_dim is None or dim <= max_dim:',
           'if max_dim is None or dim < max_dim:', "a size-limit step ends one D early"),
    Mutant("i20-size-limits-one-frame-more", EXTENSION, 'steps.append((dim, frames))',
           'steps.append((dim, frames + 1))', "the CUDA size limits accept one frame the refusal does not"),
    Mutant("i20-size-limits-ignore-dim", EXTENSION, 'if frames == 0 or fits(frames, _PROBE_MAX_SIZE):',
           'if True:', "the CUDA size limits read at D = 1 hold for every D"),
    Mutant("i20-math-product-underflows", MATH, 'return product >= smallest_normal(product) ? x / product : x / a / b;',
           'return x / product;', "cosine and coefficients divide by an underflowed product of norms"),
    Mutant("i20-math-unresolved-pair-kept", MATH,
           'if (!norm_is_live(raw_p, eps) && !norm_is_live(raw_y, eps) && eps * eps < smallest_normal(eps)) '
           'return T(0);', '', "alpha / eps^2 overflows for a pair of zero vectors: inf * 0 in the gradients"),
    Mutant("i20-triton-cosine-underflows", TRITON,
           'tl.maximum(p_norm[:, :, None] * y_norm[:, None, :], _smallest_normal(COMPUTE))',
           'p_norm[:, :, None] * y_norm[:, None, :]', "Triton's cosine divides by an underflowed product of norms"),
    Mutant("i20-triton-a-overflows", TRITON,
           'return tl.minimum(tl.maximum(a, -_largest_finite(COMPUTE)), _largest_finite(COMPUTE))', 'return a',
           "Triton's A overflows for a pair of zero vectors: inf * 0 in the gradients"),
    Mutant("i20-spec-subnormal-eps-accepted", SPEC, 'if eps < smallest:', 'if eps < smallest / 8:',
           "an eps below the compute dtype's smallest normal passes the check"),
]
