"""A memory plan before the run: each rank's peak memory estimated from the model configs and the flags, printed as
a table, and a refusal (with the cheapest changes that would fit) when it exceeds the device.

The arithmetic (everything above `# ---- reading configs and flags`) is pure: a `Shape` read from a transformers
config, the flags, bytes out. What it counts, per rank:

- parameters: N x bytes(dtype), / world size under ZeRO-3 (plus the layers ZeRO-3 gathers at a time);
- gradients of the T trained parameters: T x bytes(dtype), / world size under ZeRO-2/3, plus the reduce bucket
  (ZeRO-2: 5e7 elements, ZeRO-3: DeepSpeed's default 5e8; whole on a GPU, the written part on the CPU); on the CPU
  under ZeRO-2/3 also autograd's own T x bytes(dtype) (each weight's gradient is materialised whole before ZeRO
  copies it into the bucket; freed, it stays resident);
- optimizer: Adam's two fp32 moments, 8 T bytes, plus DeepSpeed's fp32 master copy (4 T) under bf16/fp16 or any
  ZeRO stage; / world size under ZeRO 1-3; on the host with --offload (and ZeRO-3's parameters with it); on the
  CPU under ZeRO 1-3 with 16-bit weights also the fp32 copy of the gradient partition the optimizer step makes
  (4 T / world size);
- LoRA: T is the adapters (+ a score head) with --only_optimize_lora, else everything but the wrapped weights;
- activations kept for backward: per token and layer (6h + 2 kv + 4 i) values for a LLaMA-style block (h hidden,
  kv key/value width, i MLP width; 4h + 2kv + 3i for an ungated MLP), plus, for a LLaMA-style block, the inputs
  of its two RMSNorms in fp32 whatever the dtype (2h x 4 bytes: transformers' RMSNorm upcasts and saves them), for
  micro-batch x sequence tokens; with gradient checkpointing only each layer's input (h) plus one layer's worth;
- the language-model head's logits: micro-batch x tokens x vocab, the logits plus the fp32 log-softmax and its
  gradient (LOGIT_COPIES copies at 4 bytes); a score head's are negligible;
- step 3: generation's KV cache (2 L kv x (prompt + answer) x answers per call; with vLLM its weights and
  --vllm_kv_cache_gb), the whole actor gathered for generation under ZeRO-3, the frozen reference and reward
  models (sharded or whole as --reference_zero_stage / --reward_zero_stage decide), scoring's logits (a PPO
  minibatch of rows at a time, however many answers a rollout has), and the PPO
  minibatch's activations (actor and critic in turn, not at once; no critic for critic-free estimators);
- RUNTIME_BYTES: the framework itself (CUDA context and allocator slack on a GPU; the Python process with torch,
  DeepSpeed and transformers on the CPU).

Calibrated against measured peaks (VmHWM) on the CPU with SmolLM2-135M (README, "When things go wrong").
"""
from __future__ import annotations

from dataclasses import dataclass, field

GB = 1024 ** 3
# Copies of the (tokens x vocab) logits alive at the peak of the LM loss's backward, in fp32: the log-softmax
# output, its gradient, and the gradient of the logits.
LOGIT_COPIES = 3
# DeepSpeed settings chatrlhf uses (ds_config.py): ZeRO-2's gradient bucket, ZeRO-3's (DeepSpeed's default
# reduce_bucket_size) and its live-parameter budget, in elements. A bucket is allocated whole on a GPU; on the CPU
# only the part gradients are written to becomes resident.
ZERO2_BUCKET = 5e7
ZERO3_BUCKET = 5e8
ZERO3_LIVE = 3e7 + 3e7  # stage3_max_live_parameters + stage3_prefetch_bucket_size
RUNTIME_BYTES = {"cpu": 0.9 * GB, "gpu": 1.0 * GB}
# On the CPU, memory a phase frees mostly stays resident (glibc keeps small freed blocks in its arenas), so step 3's
# phases (generation, scoring, the PPO update) add up there; on a GPU the caching allocator reuses it and the largest
# phase counts. Measured on SmolLM2: step 3's peak RSS is its static memory plus the sum of its phases within 1-2%.
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


class MemoryPlanError(RuntimeError):
    """The estimated peak memory of a rank exceeds what the device has."""


@dataclass(frozen=True)
class Shape:
    """What the arithmetic needs of a model config."""
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    gated: bool = True           # a SwiGLU MLP (gate, up, down) rather than up/down
    tied: bool = True            # the LM head shares the embedding matrix
    params: int | None = None    # the exact count when known (a meta-device model); else computed

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def block_linears(self) -> list[tuple[int, int]]:
        """(in, out) of every Linear in one transformer block."""
        h, kv, i = self.hidden, self.kv_dim, self.intermediate
        attention = [(h, self.heads * self.head_dim), (h, kv), (h, kv), (self.heads * self.head_dim, h)]
        mlp = [(h, i), (h, i), (i, h)] if self.gated else [(h, i), (i, h)]
        return attention + mlp

    def num_params(self, head: str = "causal_lm") -> int:
        """Weights of the whole model with `head` ("causal_lm" or "score"); norms counted, biases ignored."""
        if self.params is not None:
            base = self.params - (0 if self.tied else self.vocab * self.hidden)
        else:
            per_layer = sum(a * b for a, b in self.block_linears()) + 2 * self.hidden
            base = self.vocab * self.hidden + self.layers * per_layer + self.hidden
        head_params = (0 if self.tied else self.vocab * self.hidden) if head == "causal_lm" else self.hidden
        return base + head_params

    def lora_params(self, dim: int) -> int:
        return self.layers * sum(dim * (a + b) for a, b in self.block_linears())

    def wrapped_weights(self) -> int:
        """Weights of the Linear layers LoRA wraps (every Linear of the blocks, the default)."""
        return self.layers * sum(a * b for a, b in self.block_linears())

    def activation_values(self) -> int:
        """Values (in the training dtype) one token keeps for backward in one block (see the module docstring)."""
        h, kv, i = self.hidden, self.kv_dim, self.intermediate
        return 6 * h + 2 * kv + (4 * i if self.gated else 3 * i) - (0 if self.gated else 2 * h)

    def activation_fp32_bytes(self) -> int:
        """Bytes one token keeps in fp32 in one block whatever the dtype: a LLaMA-style block's two RMSNorms cast
        their input to fp32 and save that copy for backward (transformers' LlamaRMSNorm and its kin; counted by
        saved-tensor hooks on SmolLM2 in bf16: 2 x 576 fp32 values a token and layer). In fp32 the copy is the
        residual stream itself, which nothing else in the block saves, so it counts there too."""
        return 2 * self.hidden * 4 if self.gated else 0


@dataclass(frozen=True)
class Trained:
    """How one trained model is set up (the flags of a ModelArgs group and the engine)."""
    shape: Shape
    head: str = "causal_lm"
    zero_stage: int = 0
    lora_dim: int = 0
    only_optimize_lora: bool = False
    gradient_checkpointing: bool = False
    offload: bool = False
    gather_whole: bool = False  # --zero3_gather_whole in effect: whole for each training forward and backward


@dataclass
class Row:
    name: str
    device: float = 0.0   # bytes on the accelerator (the host itself on a CPU run)
    host: float = 0.0     # bytes in host RAM on a GPU run (offloaded states)
    note: str = ""


@dataclass
class Plan:
    """Per-rank estimate: rows, peak; `check` compares it with a device."""
    title: str
    rows: list[Row]
    world_size: int
    on_cpu: bool
    phases: dict[str, float] = field(default_factory=dict)  # transient bytes per phase (the largest counts)

    @property
    def transient(self) -> float:
        """The phases' memory at the peak: the largest on a GPU, all of them on the CPU (see above)."""
        values = list(self.phases.values())
        return (sum(values) if self.on_cpu else max(values)) if values else 0.0

    @property
    def device_peak(self) -> float:
        static = sum(r.device for r in self.rows)
        return static + self.transient + (self.host_peak if self.on_cpu else 0.0)

    @property
    def host_peak(self) -> float:
        return sum(r.host for r in self.rows)


def trainable_params(m: Trained) -> int:
    n = m.shape.num_params(m.head)
    if m.lora_dim <= 0:
        return n
    lora = m.shape.lora_params(m.lora_dim)
    if m.only_optimize_lora:
        return lora + (m.shape.hidden if m.head == "score" else 0)
    return n - m.shape.wrapped_weights() + lora


def model_states(name: str, m: Trained, dtype: str, world: int, on_cpu: bool = True) -> list[Row]:
    """Parameters, gradients and optimizer states of one trained model on one rank."""
    p = DTYPE_BYTES[dtype]
    n = m.shape.num_params(m.head) + (m.shape.lora_params(m.lora_dim) if m.lora_dim > 0 else 0)
    t = trainable_params(m)
    stage, shard = m.zero_stage, (world if m.zero_stage >= 1 else 1)
    rows = []
    params = n * p / (world if stage == 3 else 1)
    # ZeRO-3 gathers a layer at a time (up to ZERO3_LIVE weights); on the CPU the gathered copies, freed, stay
    # resident, so every weight ends up whole on every rank there (measured).
    gathered = (n * (1 - 1 / world) if on_cpu or m.gather_whole else min(n, ZERO3_LIVE)) * p if stage == 3 else 0.0
    on_host = m.offload and stage == 3
    rows.append(Row(f"{name} parameters", 0.0 if on_host else params + gathered,
                    params if on_host else 0.0, _note_params(n, stage, world) + (", offloaded" if on_host else "")))
    bucket = {2: ZERO2_BUCKET, 3: ZERO3_BUCKET}.get(stage, 0)
    bucket = (min(t, bucket) if on_cpu else bucket) * p
    # On the CPU, ZeRO-2/3's autograd still materialises every weight's gradient whole (T x bytes) before the hook
    # copies it into the bucket; freed, those blocks stay resident (measured: backward adds ~2 T x bytes on
    # SmolLM2, these plus the partition and the bucket). On a GPU the caching allocator reuses them.
    autograd = t * p if on_cpu and stage >= 2 else 0.0
    grads = t * p / (world if stage >= 2 else 1) + bucket + autograd
    rows.append(Row(f"{name} gradients", grads, 0.0, f"{_count(t)} trained" + (f" / {world}" if stage >= 2 else "")
                    + (f" + {human(bucket)} reduce bucket" if bucket else "")
                    + (f" + {human(autograd)} autograd's, resident" if autograd else "")))
    master = 4 * t if (p != 4 or stage >= 1) else 0  # DeepSpeed's fp32 copy of the trained weights
    optim = (8 * t + master) / shard
    if m.offload:  # ZeRO-Offload: fp32 master, moments and the fp32 gradient partition live on the host
        rows.append(Row(f"{name} optimizer", 0.0, optim + 4 * t / shard, "Adam m, v, fp32 master, offloaded"))
    else:
        rows.append(Row(f"{name} optimizer", optim, 0.0, "Adam m, v" + (", fp32 master" if master else "")
                        + (f" / {shard}" if shard > 1 else "")))
        if on_cpu and stage == 0:  # torch's AdamW (foreach) makes an fp32 temporary of each weight it steps: small
            rows.append(Row(f"{name} optimizer step", 4 * t, 0.0, "AdamW temporaries"))  # tensors, kept resident
        elif on_cpu and stage >= 1 and p != 4:
            # DeepSpeed's ZeRO optimizers step the fp32 master with an fp32 copy of the (16-bit) gradient partition
            # made at each step (stage_1_and_2: averaged_gradients .to(fp32); stage3:
            # _prepare_fp32_grad_for_sub_group).
            # Freed after the step, it stays resident on the CPU (measured: the step adds 8 T / world for m, v plus
            # 4 T / world); on a GPU it lives only during the step, when the activations are gone.
            rows.append(Row(f"{name} optimizer step", 4 * t / shard, 0.0, "fp32 gradient partition"))
    return rows


def frozen_states(name: str, shape: Shape, head: str, dtype: str, world: int, zero3: bool,
                  offload: bool = False) -> Row:
    n = shape.num_params(head)
    b = n * DTYPE_BYTES[dtype] / (world if zero3 else 1)
    return Row(f"{name} (frozen)", 0.0 if offload else b, b if offload else 0.0,
               _note_params(n, 3 if zero3 else 0, world) + (", offloaded" if offload else ""))


def activations(m: Trained, dtype: str, batch: int, seq: int, logits_len: int | None = None,
                on_cpu: bool = False) -> float:
    """Bytes kept for backward by one micro-batch of `batch` sequences of `seq` tokens (logits over
    `logits_len` positions, default all): `activation_parts` summed."""
    return sum(activation_parts(m, dtype, batch, seq, logits_len, on_cpu))


def activation_parts(m: Trained, dtype: str, batch: int, seq: int, logits_len: int | None = None,
                     on_cpu: bool = False) -> tuple[float, float]:
    """(transformer blocks, LM-head logits) bytes of `activations`. On the CPU, LoRA's unmerged adapters add one
    output per wrapped Linear that the allocator keeps (measured: +0.6 GiB for SmolLM2 at 4 x 256)."""
    s, p = m.shape, DTYPE_BYTES[dtype]
    tokens = batch * seq
    values = s.activation_values()
    if on_cpu and m.lora_dim > 0:
        values += sum(out for _, out in s.block_linears())
    per_layer = tokens * (values * p + s.activation_fp32_bytes())
    blocks = (s.layers * tokens * s.hidden * p + per_layer) if m.gradient_checkpointing else s.layers * per_layer
    logits = 0.0
    if m.head == "causal_lm":
        logits = batch * (logits_len or seq) * s.vocab * (p + LOGIT_COPIES * 4)
    return blocks, logits


def kv_cache(shape: Shape, dtype: str, batch: int, seq: int) -> float:
    return 2 * shape.layers * shape.kv_dim * batch * seq * DTYPE_BYTES[dtype]


def supervised_plan(m: Trained, *, dtype: str, world: int, batch: int, seq: int, on_cpu: bool,
                    pairs: bool = False, reference: Shape | None = None, title: str = "") -> Plan:
    """Steps 1-2 (and DPO with `reference`): one trained model; `pairs`: each example is two sequences."""
    rows = model_states("model", m, dtype, world, on_cpu)
    if reference is not None:
        rows.append(frozen_states("reference", reference, m.head, dtype, world, m.zero_stage == 3))
    rows.append(Row("runtime", RUNTIME_BYTES["cpu" if on_cpu else "gpu"], 0.0,
                    "framework" + ("" if on_cpu else ", CUDA context")))
    sequences = batch * (2 if pairs else 1)
    blocks, logits = activation_parts(m, dtype, sequences, seq, on_cpu=on_cpu)
    note = (f"{sequences} x {seq} tokens" + (", checkpointed" if m.gradient_checkpointing else "")
            + (" + logits" if m.head == "causal_lm" else ""))
    name = f"activations ({note})"
    return Plan(title, rows, world, on_cpu, {name: blocks + logits})


def ppo_plan(actor: Trained, critic: Trained | None, *, dtype: str, world: int, gen_batch: int, train_batch: int,
             prompt_len: int, answer_len: int, on_cpu: bool, reference: Shape | None, reward: Shape | None,
             offload_reference: bool = False, offload_reward: bool = False, reference_zero3: bool | None = None,
             reward_zero3: bool | None = None, vllm_kv_cache: float | None = None, title: str = "") -> Plan:
    """Step 3: actor (and critic, None for critic-free estimators) trained; reference and reward frozen (None: not
    built), ZeRO-3-sharded when `*_zero3` (default: as the actor / critic); three phases. `gen_batch`: answers
    generated per rank and call (prompts x samples per prompt)."""
    rows = model_states("actor", actor, dtype, world, on_cpu)
    if critic is not None:
        rows += model_states("critic", critic, dtype, world, on_cpu)
    if reference is not None:
        z3 = actor.zero_stage == 3 if reference_zero3 is None else reference_zero3
        rows.append(frozen_states("reference", reference, "causal_lm", dtype, world, z3, offload_reference))
    if reward is not None:
        z3 = (critic or actor).zero_stage == 3 if reward_zero3 is None else reward_zero3
        rows.append(frozen_states("reward model", reward, "score", dtype, world, z3, offload_reward))
    rows.append(Row("runtime", RUNTIME_BYTES["cpu" if on_cpu else "gpu"], 0.0,
                    "framework" + ("" if on_cpu else ", CUDA context")))
    seq = prompt_len + answer_len
    a = actor.shape
    n_actor = a.num_params() + (a.lora_params(actor.lora_dim) if actor.lora_dim > 0 else 0)
    gathered = n_actor * DTYPE_BYTES[dtype] * (1 - 1 / world) if actor.zero_stage == 3 else 0.0
    generation = kv_cache(a, dtype, gen_batch, seq) + gathered + gen_batch * a.vocab * 4 * 2
    if vllm_kv_cache is not None:  # a vLLM engine of its own: a copy of the weights and its reserved KV cache
        generation = n_actor * DTYPE_BYTES[dtype] + vllm_kv_cache
    # Scoring (experience.make_rollout -> rollout.score) runs the actor and reference a PPO minibatch of rows at a
    # time, so its logits are those of `train_batch` rows, not of all `gen_batch` answers (n answers per prompt
    # do not multiply them); the reward model scores every answer at once (no logits, hidden states only).
    chunk = min(train_batch, gen_batch)
    scoring = chunk * (answer_len + 1) * a.vocab * (DTYPE_BYTES[dtype] + 4) + \
        gen_batch * seq * a.hidden * DTYPE_BYTES[dtype] * 4
    actor_act = activations(actor, dtype, train_batch, seq, logits_len=answer_len + 1, on_cpu=on_cpu)
    critic_act = activations(critic, dtype, train_batch, seq, on_cpu=on_cpu) if critic is not None else 0.0
    gen_name = ("generation (vLLM: weights + KV cache)" if vllm_kv_cache is not None else
                f"generation (KV cache {gen_batch} x {seq}" + (", actor gathered)" if gathered else ")"))
    update = f"{train_batch} x {seq} tokens" + (", checkpointed" if actor.gradient_checkpointing else "")
    phases = {gen_name: generation, f"scoring ({chunk} x {answer_len + 1} logits at a time)": scoring}
    if on_cpu or critic is None:  # on the CPU what the actor's update freed stays resident for the critic's
        phases[f"PPO update: actor ({update})"] = actor_act
        if critic is not None:
            phases[f"PPO update: critic ({update})"] = critic_act
    else:  # actor, then critic: their activations are not alive at once
        phases[f"PPO update ({update})"] = max(actor_act, critic_act)
    return Plan(title, rows, world, on_cpu, phases)


def checkpoint_bytes(num_params: int, trained: int, dtype: str) -> float:
    """One resumable checkpoint of a model on disk (all ranks' files): its weights in `dtype` and the fp32 optimizer
    state (Adam moments and master copy) of its trained weights."""
    return num_params * DTYPE_BYTES[dtype] + 12 * trained


def fits(plan: Plan, device_bytes: float, host_bytes: float, local_ranks: int) -> bool:
    """Per-rank device peak within the device; on the CPU (one host for all local ranks) the sum of the ranks."""
    if plan.on_cpu:
        return plan.device_peak * local_ranks <= host_bytes
    return plan.device_peak <= device_bytes and plan.host_peak * local_ranks <= host_bytes


def human(b: float) -> str:
    return f"{b / GB:.2f} GB" if b >= 0.1 * GB else f"{b / 1024 ** 2:.0f} MB"


def _count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(int(n))


def _note_params(n: int, stage: int, world: int) -> str:
    return f"{_count(n)} weights" + (f" / {world} (ZeRO-3)" if stage == 3 and world > 1 else "")


def table(plan: Plan, device_bytes: float | None = None, host_bytes: float | None = None,
          local_ranks: int = 1) -> str:
    """The plan as text: one line per row and phase, the peak, and what the device has."""
    width = max([len(r.name) for r in plan.rows] + [len(k) for k in plan.phases] + [24])
    where = "host RAM" if plan.on_cpu else "device"
    lines = [f"memory plan{': ' + plan.title if plan.title else ''} (per rank, {plan.world_size} rank(s))",
             f"  {'':{width}}  {where:>10}" + ("" if plan.on_cpu else f"  {'host RAM':>10}")]
    for r in plan.rows:
        dev = r.device + (r.host if plan.on_cpu else 0.0)
        lines.append(f"  {r.name:{width}}  {human(dev):>10}" + ("" if plan.on_cpu else f"  {human(r.host):>10}")
                     + (f"  {r.note}" if r.note else ""))
    peak_phase = max(plan.phases, key=plan.phases.get) if plan.phases else None
    for k, v in plan.phases.items():
        mark = ("  (phases add up on the CPU)" if plan.on_cpu else "  <- the peak phase") if len(plan.phases) > 1 \
            and k == peak_phase else ""
        lines.append(f"  {k:{width}}  {human(v):>10}" + ("" if plan.on_cpu else f"  {'':>10}") + mark)
    lines.append(f"  {'estimated peak':{width}}  {human(plan.device_peak):>10}"
                 + ("" if plan.on_cpu else f"  {human(plan.host_peak):>10}"))
    if plan.on_cpu and host_bytes is not None:
        lines.append(f"  {'available':{width}}  {human(host_bytes / max(local_ranks, 1)):>10}  host RAM "
                     f"{human(host_bytes)} for {local_ranks} rank(s) on this host")
    elif device_bytes is not None:
        lines.append(f"  {'available':{width}}  {human(device_bytes):>10}"
                     + (f"  {human(host_bytes / max(local_ranks, 1)):>10}" if host_bytes is not None else ""))
    return "\n".join(lines)


# What to try when a plan does not fit, cheapest first: the same result for more compute (checkpointing, smaller
# micro-batches with accumulation), then communication (ZeRO), then speed (offload), then a different method (LoRA).
CHANGES = ("gradient_checkpointing", "micro_batch", "zero3", "offload", "lora")


def suggestions(build, settings: dict, ok) -> list[str]:
    """Flag changes that make `ok(build(settings))` true, each alone in CHANGES order, else cumulatively.

    `build(settings) -> Plan`; settings: {"gradient_checkpointing", "batch", "accumulation", "zero_stage",
    "offload", "lora_dim", "world"} and `flags`, a function (change, settings) -> the flags that make it."""
    flags_of = settings["flags"]

    def apply(change: str, s: dict) -> dict | None:
        s = dict(s)
        if change == "gradient_checkpointing":
            if s["gradient_checkpointing"]:
                return None
            s["gradient_checkpointing"] = True
        elif change == "micro_batch":
            if s["batch"] <= 1:
                return None
            s["accumulation"] *= s["batch"] // max(s["batch"] // 2, 1)
            s["batch"] = max(s["batch"] // 2, 1)
        elif change == "zero3":
            if s["zero_stage"] == 3:
                return None
            s["zero_stage"] = 3
        elif change == "offload":
            if s["offload"]:
                return None
            s["offload"], s["zero_stage"] = True, max(s["zero_stage"], 2)
        elif change == "lora":
            if s["lora_dim"] > 0:
                return None
            s["lora_dim"] = 64
        return s

    alone = []
    for change in CHANGES:
        s = apply(change, settings)
        while change == "micro_batch" and s is not None and not ok(build(s)) and s["batch"] > 1:
            s = apply(change, s)
        if s is not None and ok(build(s)):
            alone.append(flags_of(change, s))
    if alone:
        return alone
    s, used = dict(settings), []
    for change in CHANGES:
        nxt = apply(change, s)
        while change == "micro_batch" and nxt is not None and nxt["batch"] > 1 and not ok(build(nxt)):
            nxt = apply(change, nxt)
        if nxt is None:
            continue
        s = nxt
        used.append(flags_of(change, s))
        if ok(build(s)):
            return [" ".join(used)]
    return []


# ---- reading configs and flags (not pure: files, /proc, the accelerator) ---------------------------------------
def shape_of(name_or_path: str, exact: bool = True) -> Shape:
    """The Shape of a model folder or hub id, from its config.json alone; `exact` counts the weights on the meta
    device (no memory), otherwise the count is computed from the shape."""
    from transformers import AutoConfig

    from chatrlhf.utils.smollm2 import resolve_model_path

    config = AutoConfig.from_pretrained(resolve_model_path(name_or_path), trust_remote_code=False)
    return shape_from_config(config, count_params(config) if exact else None)


def shape_from_config(config, params: int | None = None) -> Shape:
    get = lambda *keys, default=None: next((getattr(config, k) for k in keys  # noqa: E731
                                            if isinstance(getattr(config, k, None), int)), default)
    hidden = get("hidden_size", "n_embd", "d_model")
    heads = get("num_attention_heads", "n_head", "num_heads")
    kv_heads = get("num_key_value_heads", default=heads)
    head_dim = get("head_dim", default=hidden // heads)
    inter = get("intermediate_size", "ffn_dim", "n_inner", "ffn_hidden_size", default=4 * hidden)
    act = str(getattr(config, "hidden_act", getattr(config, "activation_function", "")))
    gated = getattr(config, "model_type", "") in ("llama", "qwen2", "mistral", "qwen3", "gemma", "gemma2", "phi3",
                                                  "olmo", "olmo2", "granite", "smollm3") or "glu" in act
    return Shape(vocab=get("vocab_size"), hidden=hidden, layers=get("num_hidden_layers", "n_layer", "num_layers"),
                 heads=heads, kv_heads=kv_heads, head_dim=head_dim, intermediate=inter, gated=gated,
                 tied=bool(getattr(config, "tie_word_embeddings", True)), params=params)


def count_params(config) -> int | None:
    """Weights of the causal LM, counted on the meta device (nothing allocated); None for an exotic config."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception:  # noqa: BLE001 - fall back to the shape's own count
        return None
    return sum(p.numel() for p in model.parameters())


def available_memory(on_cpu: bool) -> tuple[float | None, float]:
    """(device bytes of one accelerator or None on the CPU, host RAM available now) from the accelerator and
    /proc/meminfo (MemAvailable), plus what this process already holds (it is part of the estimate)."""
    host = _meminfo("MemAvailable") or _meminfo("MemTotal") or 0.0
    host += _rss()
    if on_cpu:
        return None, host
    from chatrlhf.utils import distributed as dist

    return float(dist.accelerator().total_memory()), host


def host_memory_available() -> float | None:
    """Host RAM available now (/proc/meminfo's MemAvailable), None where it cannot be read."""
    return _meminfo("MemAvailable")


def _meminfo(key: str) -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return float(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _rss() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return 0.0


def peak_rss() -> float:
    """This process's peak resident memory so far (VmHWM), bytes."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0


def trained_from(model_args, engine_args, head: str, shape: Shape, stage: int | None = None,
                 budget: float | None = None) -> Trained:
    stage = model_args.zero_stage if stage is None else stage
    whole = gathers_whole(getattr(engine_args, "zero3_gather_whole", "false"), shape, head, DTYPE_BYTES.get(
        getattr(engine_args, "dtype", "bf16"), 2), stage, engine_args.offload, budget)
    return Trained(shape, head, stage, model_args.lora_dim, engine_args.only_optimize_lora,
                   model_args.gradient_checkpointing, engine_args.offload, whole)


def gathers_whole(choice: str, shape: Shape, head: str, bytes_per_param: float, stage: int, offload: bool,
                  budget: float | None) -> bool:
    """--zero3_gather_whole as builders.gather_whole decides it, judged against `budget` (None: unknown, counted
    as gathered whole, the larger figure)."""
    if stage != 3 or choice == "false":
        return False
    if choice == "true":
        return True
    return not offload and (budget is None or shape.num_params(head) * bytes_per_param <= FROZEN_SHARE * budget)


def _flags(prefix: str = "", batch_flag: str = "per_device_train_batch_size"):
    def flags_of(change: str, s: dict) -> str:
        return {"gradient_checkpointing": f"--{prefix}gradient_checkpointing",
                "micro_batch": f"--{batch_flag} {s['batch']} --gradient_accumulation_steps {s['accumulation']}",
                "zero3": f"--{prefix}zero_stage 3",
                "offload": f"--offload --{prefix}zero_stage {s['zero_stage']}",
                "lora": f"--{prefix}lora_dim {s['lora_dim']} --only_optimize_lora"}[change]
    return flags_of


def plan_supervised(model_args, optim, engine_args, train, *, head: str, world: int, dtype: str, on_cpu: bool,
                    pairs: bool = False, reference: str | None = None, title: str = "",
                    shape: Shape | None = None) -> tuple[Plan, dict, callable]:
    """(plan, settings, build) for steps 1-2 from their flag groups; `build(settings)` re-plans a variant."""
    shape = shape or shape_of(model_args.model_name_or_path)
    ref = shape_of(reference) if reference else None
    settings = {"gradient_checkpointing": model_args.gradient_checkpointing,
                "batch": train.per_device_train_batch_size, "accumulation": optim.gradient_accumulation_steps,
                "zero_stage": model_args.zero_stage, "offload": engine_args.offload, "lora_dim": model_args.lora_dim,
                "only_lora": engine_args.only_optimize_lora, "flags": _flags()}

    def build(s: dict) -> Plan:
        m = Trained(shape, head, s["zero_stage"], s["lora_dim"], s["only_lora"] or (s["lora_dim"] > 0 and
                                                                                    not model_args.lora_dim),
                    s["gradient_checkpointing"], s["offload"])
        return supervised_plan(m, dtype=dtype, world=world, batch=s["batch"], seq=train.max_seq_len, on_cpu=on_cpu,
                               pairs=pairs, reference=ref, title=title)

    return build(settings), settings, build


FROZEN_SHARE = 0.25  # builders.frozen_zero_stage: "auto" keeps a frozen replica whole up to this share of memory


def _frozen_zero3(choice, shape: Shape, dtype: str, offload: bool, budget: float | None) -> bool | None:
    """Whether a frozen model is ZeRO-3-sharded under --reference_zero_stage / --reward_zero_stage `choice`
    (None: the flag does not exist, follow the trained model's stage)."""
    if choice is None:
        return True if offload else None
    if offload or choice == "3":
        return True
    if choice == "0":
        return False
    return budget is not None and shape.num_params() * DTYPE_BYTES[dtype] > FROZEN_SHARE * budget


def plan_ppo(cfg, *, world: int, dtype: str, on_cpu: bool, title: str = "", shapes: dict | None = None,
             reward_is_function: bool = False, budget: float | None = None) -> tuple[Plan, dict, callable]:
    """(plan, settings, build) for step 3 from a PPOConfig; `shapes` may give {"actor", "critic", "reward",
    "reference"} shapes (the pipeline, before steps 1-2 have written their models); `budget`: the memory a frozen
    replica's "auto" stage is judged against (one device, or the host RAM per local rank)."""
    shapes = dict(shapes or {})
    p = cfg.ppo
    estimator = getattr(p, "estimator", None)
    needs_critic = getattr(estimator, "needs_critic", True)
    uses_reference = getattr(p, "uses_reference", True)
    actor = shapes.get("actor") or shape_of(cfg.actor.model_name_or_path)
    critic = (shapes.get("critic") or shape_of(cfg.critic.model_name_or_path)) if needs_critic else None
    shared_ref = cfg.actor.lora_dim > 0 and cfg.engine.only_optimize_lora and not cfg.reference_model_name_or_path
    reference = None if shared_ref or not uses_reference else (shapes.get("reference") or (
        shape_of(cfg.reference_model_name_or_path) if cfg.reference_model_name_or_path else actor))
    reward = None
    if not reward_is_function:
        reward = shapes.get("reward") or (shape_of(cfg.reward_model_name_or_path) if cfg.reward_model_name_or_path
                                          else critic or shape_of(cfg.critic.model_name_or_path))
    samples = getattr(p, "n_samples_per_prompt", 1)
    hybrid = getattr(cfg, "hybrid", None)
    vllm = (hybrid.vllm_kv_cache_gb * GB if getattr(hybrid, "generation_backend", "hf") == "vllm" else None)
    ref_z3 = None if reference is None else _frozen_zero3(getattr(cfg, "reference_zero_stage", None), reference,
                                                           dtype, cfg.offload_reference_model, budget)
    reward_z3 = None if reward is None else _frozen_zero3(getattr(cfg, "reward_zero_stage", None), reward, dtype,
                                                          cfg.offload_reward_model, budget)
    settings = {"gradient_checkpointing": cfg.actor.gradient_checkpointing,
                "batch": cfg.per_device_training_batch_size, "accumulation": cfg.actor_optim.gradient_accumulation_steps,
                "zero_stage": cfg.actor.zero_stage, "offload": cfg.engine.offload, "lora_dim": cfg.actor.lora_dim,
                "flags": _flags_ppo}

    def build(s: dict) -> Plan:
        lora_only = cfg.engine.only_optimize_lora or (s["lora_dim"] > 0 and not cfg.actor.lora_dim)
        whole = lambda shape, head, stage: gathers_whole(  # noqa: E731
            getattr(cfg.engine, "zero3_gather_whole", "false"), shape, head, DTYPE_BYTES[dtype], stage, s["offload"],
            budget) and not (head == "causal_lm" and getattr(hybrid, "unpin_actor_parameters", False))
        a = Trained(actor, "causal_lm", s["zero_stage"], s["lora_dim"], lora_only, s["gradient_checkpointing"],
                    s["offload"], whole(actor, "causal_lm", s["zero_stage"]))
        c = None
        if critic is not None:
            # A suggested stage applies to both models (the suggestion's flags set both; offload needs ZeRO >= 1).
            critic_stage = (cfg.critic.zero_stage if s["zero_stage"] == cfg.actor.zero_stage
                            else max(cfg.critic.zero_stage, s["zero_stage"]))
            c = Trained(critic, "score", critic_stage, cfg.critic.lora_dim, cfg.engine.only_optimize_lora,
                        s["gradient_checkpointing"] or cfg.critic.gradient_checkpointing, s["offload"],
                        whole(critic, "score", critic_stage))
        return ppo_plan(a, c, dtype=dtype, world=world, gen_batch=cfg.per_device_generation_batch_size * samples,
                        train_batch=s["batch"], prompt_len=cfg.max_prompt_seq_len, answer_len=cfg.max_answer_seq_len,
                        on_cpu=on_cpu, reference=reference, reward=reward,
                        offload_reference=cfg.offload_reference_model, offload_reward=cfg.offload_reward_model,
                        reference_zero3=ref_z3, reward_zero3=reward_z3, vllm_kv_cache=vllm, title=title)

    return build(settings), settings, build


def _flags_ppo(change: str, s: dict) -> str:
    return {"gradient_checkpointing": "--actor_gradient_checkpointing --critic_gradient_checkpointing",
            "micro_batch": f"--per_device_training_batch_size {s['batch']}",
            "zero3": "--actor_zero_stage 3 --critic_zero_stage 3",
            "offload": f"--offload --actor_zero_stage {s['zero_stage']} --critic_zero_stage {s['zero_stage']}",
            "lora": f"--actor_lora_dim {s['lora_dim']} --only_optimize_lora"}[change]


_last: dict = {}  # the plan of this process's run, for the measured-peak line at its end


def check(plan: Plan, settings: dict, build, *, enforce: bool, local_ranks: int, print_fn=print) -> Plan:
    """Prints the plan's table; raises MemoryPlanError with the cheapest changes that fit when it does not fit
    the device (unless not `enforce`, then a warning)."""
    device, host = available_memory(plan.on_cpu)
    print_fn(table(plan, device, host, local_ranks))
    _last.update(plan=plan)
    ok = lambda p: fits(p, device or 0.0, host, local_ranks)  # noqa: E731
    if ok(plan):
        return plan
    where = (f"{human(host)} of host RAM for {local_ranks} rank(s)" if plan.on_cpu
             else f"{human(device)} per device")
    changes = suggestions(build, settings, ok)
    advice = ("\n".join(f"  {c}" for c in changes) if changes else
              "  none of gradient checkpointing, smaller micro-batches, ZeRO-3, offload or LoRA is enough: use more "
              "or bigger devices, or a smaller model")
    message = (f"the memory plan{' of ' + plan.title if plan.title else ''} needs about "
               f"{human(plan.device_peak)} per rank, more than the {where}. Changes that would fit, cheapest first:"
               f"\n{advice}\n(--memory_check false starts anyway.)")
    if not enforce:
        print_fn(f"WARNING: {message}")
        return plan
    raise MemoryPlanError(message)


def report_measured(print_fn=print) -> None:
    """One line per rank at the end of a run: the measured peak next to the plan (calibration, surprises)."""
    from chatrlhf.utils import distributed as dist

    plan = _last.get("plan")
    measured = peak_rss()
    line = f"[rank {dist.get_rank()}] peak host memory (VmHWM) {human(measured)}"
    if dist.accelerator().device_name() != "cpu":
        try:
            line += f", device {human(dist.accelerator().max_memory_allocated())}"
        except Exception:  # noqa: BLE001 - not every accelerator reports it
            pass
    if plan is not None:
        line += f"; memory plan {human(plan.device_peak)}"
    print_fn(line)


def local_ranks() -> int:
    """Ranks on this host: LOCAL_WORLD_SIZE (torchrun) or LOCAL_SIZE (the deepspeed launcher), else 1."""
    import os

    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        if os.environ.get(key, "").isdigit():
            return max(int(os.environ[key]), 1)
    return 1


def _decide(make_plan, enforce: bool) -> Plan | None:
    """Rank 0 plans and checks (ranks could read /proc/meminfo a moment apart and disagree); every rank raises
    alike."""
    from chatrlhf.utils import distributed as dist
    from chatrlhf.utils.logging import print0

    error, plan = None, None
    if dist.is_main_process():
        try:
            plan, settings, build = make_plan()
            check(plan, settings, build, enforce=enforce, local_ranks=local_ranks(), print_fn=print0)
        except MemoryPlanError as e:
            error = str(e)
        except Exception as e:  # noqa: BLE001 - an estimate that cannot be made must not stop (or hang) the run
            print0(f"memory plan skipped: {type(e).__name__}: {e}")
    error = dist.broadcast_object(error)
    if error is not None:
        raise MemoryPlanError(error)
    return plan


def _run_context(engine_args) -> tuple[int, str, bool]:
    from chatrlhf.training.precision import training_dtype
    from chatrlhf.utils import distributed as dist

    return dist.get_world_size(), training_dtype(engine_args.dtype), dist.accelerator().device_name() == "cpu"


def check_supervised(cfg, *, head: str, pairs: bool = False, reference: str | None = None,
                     title: str = "") -> Plan | None:
    """Steps 1-2 (and DPO): plans the run of `cfg` (model, optim, engine, train groups) before its engine is built;
    prints the table on rank 0; raises MemoryPlanError when it does not fit (--memory_check false: a warning)."""
    world, dtype, on_cpu = _run_context(cfg.engine)
    return _decide(lambda: plan_supervised(cfg.model, cfg.optim, cfg.engine, cfg.train, head=head, world=world,
                                           dtype=dtype, on_cpu=on_cpu, pairs=pairs, reference=reference,
                                           title=title), cfg.train.memory_check)


def check_ppo(cfg, *, reward_is_function: bool = False) -> Plan | None:
    """Step 3: as `check_supervised`, for actor, critic, reference and reward model."""
    world, dtype, on_cpu = _run_context(cfg.engine)

    def make():
        device, host = available_memory(on_cpu)
        budget = host / local_ranks() if on_cpu else device
        return plan_ppo(cfg, world=world, dtype=dtype, on_cpu=on_cpu, title="step 3",
                        reward_is_function=reward_is_function, budget=budget)

    return _decide(make, cfg.run.memory_check)
