# %% [markdown]
# # Large vocabularies: the memory of the output layer
#
# A language model's last layer turns hidden states $x$ (`[tokens, D]`) into logits
# $z = xW$ (`[tokens, V]`) over a vocabulary of $V$ words, and the loss is the
# cross-entropy of those logits. With modern vocabularies the logits are the largest
# array of the whole training step: for Gemma 2 (2B), 8192 tokens times 256,000 words
# is 2.1 billion numbers, 7.8 GiB in float32, and training also needs their gradient.
#
# `jxent.linear_softmax_cross_entropy(x, w, labels)` computes exactly
# `softmax_cross_entropy_with_integer_labels(x @ w, labels)` without ever holding the
# logits: it forms them one block at a time, reduces each block on the spot (an online
# log-sum-exp), and recomputes them block by block in the backward pass.
#
# This notebook measures what that saves, with XLA's **compiled memory analysis**: the
# training step `value_and_grad` is lowered and compiled for abstract
# `jax.ShapeDtypeStruct` inputs, and `memory_analysis().temp_size_in_bytes` reports the
# scratch memory the compiled program allocates besides its inputs and outputs. Nothing
# is allocated, so even the Gemma-2 shape runs in seconds on a laptop CPU, and the
# numbers are exact. (They are XLA:CPU's; a GPU compiler fuses differently, but the
# `tokens x V` terms that dominate are the same.)

# %%
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import jxent

plt.rcParams.update({"figure.dpi": 80, "axes.grid": True})
GiB = 2**30
print("jax", jax.__version__, "| jxent", jxent.__version__, "| backend", jax.default_backend())

# %% [markdown]
# ## The same loss, two ways
#
# First, on a small problem, check that the fused loss and its gradients equal the
# unfused ones (the logits materialised, then jxent's cross-entropy), and both equal a
# float64 NumPy computation.

# %%
def unfused(x, w, labels):
    return jxent.softmax_cross_entropy_with_integer_labels(x @ w, labels, reduction="mean")


def unfused_optax(x, w, labels):
    return optax.losses.softmax_cross_entropy_with_integer_labels(x @ w, labels).mean()


def fused(x, w, labels):
    return jxent.linear_softmax_cross_entropy(x, w, labels, reduction="mean")


kx, kw, ky = jax.random.split(jax.random.key(0), 3)
n, d, v = 64, 32, 1000
x = jax.random.normal(kx, (n, d))
w = jax.random.normal(kw, (d, v)) / np.sqrt(d)
labels = jax.random.randint(ky, (n,), 0, v)

loss_u, (dx_u, dw_u) = jax.value_and_grad(unfused, argnums=(0, 1))(x, w, labels)
loss_f, (dx_f, dw_f) = jax.jit(jax.value_and_grad(fused, argnums=(0, 1)))(x, w, labels)

# float64 NumPy: loss = mean(lse(z) - z_y); dz = (softmax(z) - onehot) / n
z = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
m = z.max(1, keepdims=True)
lse = (m + np.log(np.exp(z - m).sum(1, keepdims=True)))[:, 0]
loss_np = np.mean(lse - z[np.arange(n), np.asarray(labels)])
dz = (np.exp(z - lse[:, None]) - np.eye(v)[np.asarray(labels)]) / n
print(f"loss: fused {float(loss_f):.6f}  unfused {float(loss_u):.6f}  NumPy {loss_np:.6f}")
np.testing.assert_allclose(loss_f, loss_np, rtol=1e-5)
np.testing.assert_allclose(loss_u, loss_np, rtol=1e-5)
np.testing.assert_allclose(dx_f, dz @ np.asarray(w, np.float64).T, rtol=1e-4, atol=1e-6)
np.testing.assert_allclose(dw_f, np.asarray(x, np.float64).T @ dz, rtol=1e-4, atol=1e-6)
np.testing.assert_allclose(dw_f, dw_u, rtol=1e-4, atol=1e-6)

# %% [markdown]
# ## Measuring memory without allocating it
#
# `temp_bytes(loss, tokens, D, V)` compiles `value_and_grad` of a loss with respect to
# both `x` and `W`, for bfloat16 `x` and `W` (the usual mixed-precision set-up) and
# int32 labels, and returns the temporary memory of the compiled program. The inputs
# and the outputs (the loss, and gradients the size of `x` and `W`) are not counted:
# they are the same for every method.

# %%
def temp_bytes(loss, tokens, d, v, dtype=jnp.bfloat16):
    args = (
        jax.ShapeDtypeStruct((tokens, d), dtype),
        jax.ShapeDtypeStruct((d, v), dtype),
        jax.ShapeDtypeStruct((tokens,), jnp.int32),
    )
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    return step.lower(*args).compile().memory_analysis().temp_size_in_bytes


MODELS = {  # name: (tokens, D, V)
    "Gemma-2 2B": (8192, 2304, 256000),
    "Llama-3 8B": (8192, 4096, 128256),
}
print(f"{'':12}{'logits (f32)':>14}{'optax unfused':>15}{'jxent unfused':>15}"
      f"{'jxent fused':>13}{'saving':>8}")
model_points = {}
for name, (t, d, v) in MODELS.items():
    mem = {f.__name__: temp_bytes(f, t, d, v) / GiB for f in (unfused_optax, unfused, fused)}
    model_points[name] = mem
    print(f"{name:12}{t * v * 4 / GiB:10.2f} GiB{mem['unfused_optax']:11.2f} GiB"
          f"{mem['unfused']:11.2f} GiB{mem['fused']:9.2f} GiB"
          f"{mem['unfused'] / mem['fused']:7.1f}x")
    assert mem["fused"] < mem["unfused"] / 4

# %% [markdown]
# Temporary memory of one training step of the loss alone (the transformer below it
# comes on top), in GiB. Unfused, the step keeps float32 buffers the size of the logits
# (the logits and their gradient); fused, it keeps only a block of logits at a time and
# buffers the size of `x`.
#
# ## Memory against vocabulary size and against tokens
#
# Two sweeps with Llama-3's hidden size, D = 4096: the vocabulary at 8192 tokens, and
# the tokens at Llama-3's vocabulary. The two models' shapes are marked (Gemma 2 has
# D = 2304, so its point sits slightly off the D = 4096 curves).

# %%
d = 4096
vocabs = [8192, 32768, 128256, 256000]
tokens = [1024, 4096, 16384, 65536]
by_vocab = {f: [temp_bytes(f, 8192, d, v) / GiB for v in vocabs] for f in (unfused, fused)}
by_tokens = {f: [temp_bytes(f, t, d, 128256) / GiB for t in tokens] for f in (unfused, fused)}

style = {unfused: ("unfused: x @ W, then cross-entropy", "tab:red"),
         fused: ("fused: linear_softmax_cross_entropy", "tab:blue")}
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4.2))
for f, (label, color) in style.items():
    ax1.plot(vocabs, by_vocab[f], "o-", color=color, label=label)
    ax2.plot(tokens, by_tokens[f], "o-", color=color, label=label)
for name, marker in zip(MODELS, ("*", "P")):
    t, _, v = MODELS[name]
    for f, (_, color) in style.items():
        ax1.plot(v, model_points[name][f.__name__], marker, ms=13, color=color, mec="k")
    ax1.annotate(name, (v, model_points[name]["unfused"]), textcoords="offset points",
                 xytext=(-12, 4), ha="right", fontsize=9)
ax2.axvline(8192, color="gray", ls=":")
ax2.annotate("Llama-3 8B\n(8192 tokens)", (8192, model_points["Llama-3 8B"]["fused"]),
             textcoords="offset points", xytext=(5, 25), fontsize=9)
ax1.set(xscale="log", yscale="log", xlabel="vocabulary size V", ylabel="temporary GiB",
        title="8192 tokens, D = 4096")
ax2.set(xscale="log", yscale="log", xlabel="tokens per step", ylabel="temporary GiB",
        title="V = 128256, D = 4096")
fig.legend(*ax1.get_legend_handles_labels(), loc="lower center", ncol=2, fontsize=9)
fig.suptitle("compiled temporary memory of value_and_grad (bfloat16 x and W)", fontsize=11)
fig.tight_layout(rect=(0, 0.07, 1, 1))
plt.show()

# Memory per extra token: the slope of a straight-line fit over the token sweep.
per_token = {f: np.polyfit(tokens, np.array(by_tokens[f]) * GiB, 1)[0] for f in style}
print(f"unfused: {per_token[unfused] / 1024:7.1f} KiB per token = "
      f"{per_token[unfused] / (4 * 128256):.2f} float32 rows of V = 128256 logits")
print(f"fused:   {per_token[fused] / 1024:7.1f} KiB per token = "
      f"{per_token[fused] / (4 * d):.2f} float32 rows of D = {d} hidden values")
assert per_token[unfused] > 8 * per_token[fused]

# %% [markdown]
# The unfused loss grows in proportion to `tokens x V`: each extra token costs float32
# rows of logits, hundreds of kilobytes at these vocabularies. The fused loss grows
# with `tokens x D` instead, about a float32 row of hidden size per token (such as a
# float32 accumulator for the gradient of `x`), plus the working set of one block of
# logits. With V some thirty to a hundred times D, the memory saved can go
# to a longer sequence or a larger batch.
#
# How it works, in brief: the forward pass visits blocks of the vocabulary, computes
# that block's logits `x @ W[:, block]` in float32, and folds them into a running
# maximum and sum of exponentials per token (the online softmax of Milakov and
# Gimelshein, 2018). The backward pass revisits the blocks, recomputes the logits,
# forms `softmax - onehot` for the block and immediately contracts it into the
# gradients `dx += dz @ W[:, block].T` and `dW[:, block] = x.T @ dz`. This is the
# idea of Cut Cross-Entropy (Wijmans et al., 2024) and Liger Kernel's fused linear
# cross-entropy (Hsu et al., 2024), written in plain JAX, so it runs on any backend.
# The block sizes are chosen from the shapes (`chunk_size=None`) or set by hand.

# %% [markdown]
# ## Distillation from a teacher's top-k, fused
#
# Knowledge distillation trains a student on a teacher's next-token distribution:
# $T^2\,\mathrm{KL}(p \,\|\, q)$ with $p = \mathrm{softmax}(t / T)$ the teacher's and
# $q = \mathrm{softmax}(s / T)$ the student's, at a temperature $T$ (Hinton et al.,
# 2015). The student's logits $s = xW$ are as large as above, so the fused losses take
# the student's hidden states instead:
#
# - `jxent.linear_softmax_kl_divergence(x, w, teacher, temperature=T)`: the divergence;
# - `jxent.linear_distillation_loss(x, w, labels, teacher, alpha=..., temperature=T)`:
#   $\alpha\,\mathrm{CE}(s, y) + (1 - \alpha)\,T^2\,\mathrm{KL}$, both terms from one
#   read of each block of $W$.
#
# The teacher is given by its **top-k**: the indices and log-probabilities of its `k`
# most likely classes per token, `jax.lax.top_k(jax.nn.log_softmax(teacher_logits / T), k)`
# (the form distillation data is stored in; the teacher's logits are needed only to
# make them). The divergence is then the sum over those `k` classes,
# $T^2 \sum_{k} p_k (\log p_k - \log q_k)$, with the student's $\log q$ normalised over
# the whole vocabulary. With `k = V` it is the full divergence, which jxent's logits
# loss `softmax_kl_divergence` computes from materialised logits.
#
# First the values and gradients, against the unfused compositions.

# %%
T, alpha, top = 2.0, 0.5, 16
kx, kw, kt, ky = jax.random.split(jax.random.key(1), 4)
n, d, v = 64, 32, 1000
x = jax.random.normal(kx, (n, d))
w = jax.random.normal(kw, (d, v)) / np.sqrt(d)
labels = jax.random.randint(ky, (n,), 0, v)
teacher_logits = 2.0 * jax.random.normal(kt, (n, v))


def teacher_top_k(teacher_logits, k):
    """(indices, log-probabilities) of the teacher's k most likely classes at T."""
    log_p, index = jax.lax.top_k(jax.nn.log_softmax(teacher_logits / T), k)
    return index, log_p


def kl_unfused(x, w, teacher):
    index, log_p = teacher
    log_q = jax.nn.log_softmax((x @ w) / T)  # the student's [tokens, V] log-probabilities
    log_q_top = jnp.take_along_axis(log_q, index, axis=-1)
    return jnp.mean(T**2 * jnp.sum(jnp.exp(log_p) * (log_p - log_q_top), axis=-1))


def kl_fused(x, w, teacher):
    return jxent.linear_softmax_kl_divergence(x, w, teacher, temperature=T)


def distill_unfused(x, w, labels, teacher):
    ce = jxent.softmax_cross_entropy_with_integer_labels(x @ w, labels, reduction="mean")
    return alpha * ce + (1 - alpha) * kl_unfused(x, w, teacher)


def distill_fused(x, w, labels, teacher):
    return jxent.linear_distillation_loss(x, w, labels, teacher, alpha=alpha, temperature=T)


def kl_on_logits(x, w, teacher_logits):
    return jxent.softmax_kl_divergence(x @ w, teacher_logits, temperature=T, reduction="mean")


# k = V: the whole teacher, the same as jxent's logits loss on materialised logits
value_f = jax.jit(kl_fused)(x, w, teacher_top_k(teacher_logits, v))
value_u = jax.jit(kl_on_logits)(x, w, teacher_logits)
print(f"k = V:   fused {float(value_f):.6f}   "
      f"softmax_kl_divergence(x @ w, teacher_logits) {float(value_u):.6f}")
np.testing.assert_allclose(value_f, value_u, rtol=1e-5)

# k = 16: the fused losses against the unfused compositions, values and gradients
teacher = teacher_top_k(teacher_logits, top)
for name, fused_loss, unfused_loss, args in [
    ("KL", kl_fused, kl_unfused, (x, w, teacher)),
    ("alpha CE + (1 - alpha) KL", distill_fused, distill_unfused, (x, w, labels, teacher)),
]:
    value_f, grads_f = jax.jit(jax.value_and_grad(fused_loss, argnums=(0, 1)))(*args)
    value_u, grads_u = jax.jit(jax.value_and_grad(unfused_loss, argnums=(0, 1)))(*args)
    print(f"k = {top}:  {name}: fused {float(value_f):.6f}   unfused {float(value_u):.6f}")
    np.testing.assert_allclose(value_f, value_u, rtol=1e-5)
    for g_f, g_u in zip(grads_f, grads_u):
        np.testing.assert_allclose(g_f, g_u, rtol=1e-4, atol=1e-6)

# %% [markdown]
# The memory of a training step of the student's output layer, measured as above
# (`value_and_grad` with respect to `x` and `W`, bfloat16, compiled, nothing
# allocated), with the teacher's top 64 classes per token as input, at a moderate shape
# (4096 tokens, D = 1024, V = 32000) and at Gemma 2's output layer. The fused
# cross-entropy alone is the reference: the distillation loss reads the same blocks.

# %%
def distill_temp_bytes(loss, tokens, d, v, k=64, dtype=jnp.bfloat16):
    args = (
        jax.ShapeDtypeStruct((tokens, d), dtype),
        jax.ShapeDtypeStruct((d, v), dtype),
        jax.ShapeDtypeStruct((tokens,), jnp.int32),
        (jax.ShapeDtypeStruct((tokens, k), jnp.int32),  # the teacher's top-k classes
         jax.ShapeDtypeStruct((tokens, k), jnp.float32)),  # and log-probabilities
    )
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    return step.lower(*args).compile().memory_analysis().temp_size_in_bytes


def xent_fused(x, w, labels, teacher):
    return jxent.linear_softmax_cross_entropy(x, w, labels, reduction="mean")


print(f"{'':26}{'unfused':>12}{'fused distillation':>20}{'fused cross-entropy':>21}")
# The single pass at the moderate shape holds a block of logits: "a fraction" there,
# tens of times less at Gemma 2's.
for name, shape, fraction in [("4096 x 1024 x 32000", (4096, 1024, 32000), 2),
                              ("Gemma-2 2B", MODELS["Gemma-2 2B"], 20)]:
    mem = {f: distill_temp_bytes(f, *shape) / GiB
           for f in (distill_unfused, distill_fused, xent_fused)}
    print(f"{name:26}{mem[distill_unfused]:8.2f} GiB{mem[distill_fused]:16.2f} GiB"
          f"{mem[xent_fused]:17.2f} GiB")
    assert mem[distill_fused] <= 2 * mem[xent_fused]
    assert mem[distill_fused] < mem[distill_unfused] / fraction

# %% [markdown]
# At Gemma 2's shape the unfused distillation step needs tens of GiB (the student's
# logits, their softmax and its gradient, all `[tokens, V]` in float32); the fused one
# about what the fused cross-entropy needs. At the moderate shape the `[D, V]` weight
# gradient is small enough (at most 256 MiB in float32) for the engine's single-pass
# schedule, whose token blocks span the whole vocabulary: faster, and a logits block of
# `2 D` tokens by `V` columns in memory, still a fraction of the unfused step.
#
# `python -m jxent.examples.train distill` trains a small byte-level student this way
# from a larger teacher and reports both models' held-out bits per byte.
