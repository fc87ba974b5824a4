# %% [markdown]
# # Where the naive formulas break, and how jxent avoids it
#
# The cross-entropy is a one-line formula, $-\log \mathrm{softmax}(z)_y$, and written
# as that one line it fails in floating point in four common ways:
#
# 1. **overflow** in $e^{z}$ for large logits;
# 2. **$\log 0$** when a probability underflows to zero;
# 3. **NaN gradients** from masked ($-\infty$) logits, through $0 \cdot \infty$;
# 4. **round-off** in bfloat16, which keeps only about three significant digits.
#
# For each, this notebook puts side by side a *naive* jnp implementation, optax (which
# already avoids several of these), jxent, and the exact answer from a float64 NumPy
# formula. The assertions check jxent against the exact answer.

# %%
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jxent

np.set_printoptions(precision=6, suppress=False)
print("jax", jax.__version__, "| optax", optax.__version__, "| jxent", jxent.__version__)


def fmt(v):
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "NO"
    return f"{float(v):.7g}"


def table(title, columns, rows):
    """Prints rows of numbers under column names."""
    print(title)
    print(" " * 22 + "".join(f"{c:>16}" for c in columns))
    for name, values in rows.items():
        print(f"  {name:<20}" + "".join(f"{fmt(v):>16}" for v in values))


def exact_xent(z, y):
    """log-sum-exp(z) - z_y in float64, with the max subtracted first."""
    z = np.asarray(z, np.float64)
    m = z.max(-1)
    return m + np.log(np.exp(z - m[..., None]).sum(-1)) - np.take_along_axis(z, y[..., None], -1)[..., 0]


def naive_xent(z, y):
    """-log(exp(z_y) / sum exp(z)): the textbook formula, term by term."""
    e = jnp.exp(z)
    return -jnp.log(jnp.take_along_axis(e, y[:, None], -1)[:, 0] / e.sum(-1))

# %% [markdown]
# ## 1. Overflow in `exp`
#
# $e^{89}$ is already beyond float32's largest number ($3.4 \times 10^{38}$), and
# $e^{-104}$ is below its smallest. The textbook formula then divides $\infty$ by
# $\infty$, or $0$ by $0$: NaN. Logits of a few hundred are rare in a healthy model but
# common in a diverging one, after a bad initialisation, or with temperature scaling.
#
# The fix is the log-sum-exp identity
# $\log \sum_k e^{z_k} = m + \log \sum_k e^{z_k - m}$ with $m = \max_k z_k$, so every
# exponent is $\le 0$. optax uses it too. jxent additionally writes the loss as a sum of
# non-negative terms, so nothing cancels: it is exact even for logits near the float32
# maximum, and for two logits of $-1000$, where the subtraction $-999.3 - (-1000)$ in
# float32 loses digits.

# %%
z = jnp.array([[1000.0, 0.0], [89.0, 0.0], [3e38, 0.0], [-1000.0, -1000.0], [2.0, 1.0]])
y = jnp.array([1, 0, 1, 0, 0])
exact = exact_xent(z, y)
naive = naive_xent(z, y)
via_optax = optax.losses.softmax_cross_entropy_with_integer_labels(z, y)
via_jxent = jxent.softmax_cross_entropy_with_integer_labels(z, y)
columns = ["[1000, 0], y=1", "[89, 0], y=0", "[3e38, 0], y=1", "[-1000,-1000]", "[2, 1], y=0"]
table("cross-entropy of two logits", columns,
      {"naive": naive, "optax": via_optax, "jxent": via_jxent, "exact (float64)": exact})

np.testing.assert_allclose(via_jxent, exact, rtol=1e-6, atol=1e-30)
assert not np.isfinite(naive[0]) and np.isnan(naive[3])

# %% [markdown]
# ## 2. `log(0)`
#
# Computing probabilities first and taking their log afterwards throws information
# away: a probability of $e^{-200}$ is 0 in float32, so $-\log$ of it is $\infty$ (the
# true loss is 200), and the gradient is NaN ($\infty \cdot 0$). The same happens in the
# binary case with `-log(sigmoid(x))`. Working with logits in log space avoids it:
# $-\log \sigma(x) = \mathrm{softplus}(-x)$ is exact for any $x$.
#
# When only probabilities are available (`binary_cross_entropy(probs, labels)`), the
# information is already gone; jxent follows PyTorch and clamps each log at $-100$, so a
# confidently wrong probability costs 100 rather than infinity. Prefer the logits form.

# %%
z = jnp.array([0.0, -200.0])


def naive_log_softmax_loss(z):
    return -jnp.log(jax.nn.softmax(z))[1]


def jxent_loss(z):
    return jxent.softmax_cross_entropy_with_integer_labels(z, 1)


def optax_loss(z):
    return optax.losses.softmax_cross_entropy_with_integer_labels(z, 1)


rows = {}
for name, f in [("naive", naive_log_softmax_loss), ("optax", optax_loss), ("jxent", jxent_loss)]:
    value, grad = jax.value_and_grad(f)(z)
    rows[name] = [value, *grad]
rows["exact (float64)"] = [200.0, *(np.array([1.0, np.exp(-200)]) - [0, 1])]
table("softmax cross-entropy of logits [0, -200] with label 1", ["loss", "d/dz0", "d/dz1"], rows)
np.testing.assert_allclose(rows["jxent"], rows["exact (float64)"], rtol=1e-6)
print()

x = jnp.array([-200.0, 30.0, 0.5])
t = jnp.array([1.0, 0.0, 1.0])


def naive_bce(x):
    p = jax.nn.sigmoid(x)
    return -(t * jnp.log(p) + (1 - t) * jnp.log(1 - p))


exact = np.logaddexp(0.0, -np.where(np.asarray(t) > 0, 1, -1) * np.asarray(x, np.float64))
rows = {
    "naive -log(sigmoid)": naive_bce(x),
    "optax": optax.losses.sigmoid_binary_cross_entropy(x, t),
    "jxent": jxent.sigmoid_binary_cross_entropy(x, t),
    "exact (float64)": exact,
}
table("binary cross-entropy from logits", ["x=-200, t=1", "x=30, t=0", "x=0.5, t=1"], rows)
grads = jax.grad(lambda x: jxent.sigmoid_binary_cross_entropy(x, t).sum())(x)
print("  jxent gradient:", np.asarray(grads), "  naive gradient:",
      np.asarray(jax.grad(lambda x: naive_bce(x).sum())(x)))
np.testing.assert_allclose(rows["jxent"], exact, rtol=1e-6)
np.testing.assert_allclose(grads, jax.nn.sigmoid(x) - t, rtol=1e-6)
print()

p = jnp.array([0.0, 1.0, 0.3])
t = jnp.array([1.0, 0.0, 1.0])
table("binary cross-entropy from probabilities", ["p=0, t=1", "p=1, t=0", "p=0.3, t=1"], {
    "naive -log": -(t * jnp.log(p) + (1 - t) * jnp.log(1 - p)),
    "jxent (log clamped)": jxent.binary_cross_entropy(p, t),
})
np.testing.assert_allclose(jxent.binary_cross_entropy(p, t), [100.0, 100.0, -np.log(0.3)], rtol=1e-6)

# %% [markdown]
# ## 3. NaN gradients from masked logits
#
# Setting a logit to $-\infty$ is the standard way to forbid a class: a token outside
# a constrained vocabulary, an illegal move, a padded slot. Its probability is exactly
# 0, and so is its target. But the loss term $t_k \log q_k = 0 \cdot (-\infty)$ is NaN
# in IEEE arithmetic, and so is its gradient; a single NaN then poisons the whole
# batch's update. Rows where *every* logit is masked (pure padding) are worse: the
# softmax itself is $0/0$.
#
# optax's `softmax_cross_entropy` returns NaN here; its `safe_softmax_cross_entropy`
# fixes the value but, on a fully masked row, not the gradient. jxent's definition is
# that a term with a zero target contributes exactly 0, in value and gradient, and a
# row with nothing left gives loss 0 and gradient 0. The same holds for the entropy and
# the KL divergence.

# %%
inf = jnp.inf
logits = jnp.array([[2.0, -inf, 0.5], [-inf, -inf, -inf]])
targets = jnp.array([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])


def naive_dense(z, t):
    return -jnp.sum(t * jax.nn.log_softmax(z), axis=-1)


contenders = {
    "naive": naive_dense,
    "optax": optax.losses.softmax_cross_entropy,
    "optax safe_softmax": optax.losses.safe_softmax_cross_entropy,
    "jxent": jxent.softmax_cross_entropy,
}
rows = {}
for name, f in contenders.items():
    value = f(logits, targets)
    grad = jax.grad(lambda z: f(z, targets).sum())(logits)
    rows[name] = [value[0], value[1], np.all(np.isfinite(grad[0])), np.all(np.isfinite(grad[1]))]
print("rows: [2, -inf, 0.5] with target [1, 0, 0]; [-inf, -inf, -inf] with target 0")
table("dense cross-entropy", ["loss row 0", "loss row 1", "grad 0 finite", "grad 1 finite"], rows)

q = np.exp(np.array([2.0, 0.5]) - np.logaddexp(2.0, 0.5))
expected_loss = [-np.log(q[0]), 0.0]
expected_grad = [[q[0] - 1, 0.0, q[1]], [0.0, 0.0, 0.0]]
grad = jax.grad(lambda z: jxent.softmax_cross_entropy(z, targets).sum())(logits)
print("\njxent gradient:\n", np.asarray(grad))
np.testing.assert_allclose(jxent.softmax_cross_entropy(logits, targets), expected_loss, rtol=1e-6)
np.testing.assert_allclose(grad, expected_grad, rtol=1e-6, atol=1e-7)

# %% [markdown]
# The entropy $-\sum p \log p$ and the KL divergence $\sum t (\log t - \log q)$ meet
# the same $0 \cdot \infty$ on masked classes:

# %%
z = jnp.array([2.0, -inf, 0.5])


def naive_entropy(z):
    p = jax.nn.softmax(z)
    return -jnp.sum(p * jax.nn.log_softmax(z))


rows = {}
for name, f in [("naive", naive_entropy), ("jxent", jxent.entropy)]:
    value, grad = jax.value_and_grad(f)(z)
    rows[name] = [value, *grad]
p = np.array([q[0], 0.0, q[1]])
h = -(q * np.log(q)).sum()
log_p = np.log(np.where(p > 0, p, 1.0))
rows["exact (float64)"] = [h, *np.where(p > 0, -p * (log_p + h), 0.0)]
table("entropy of softmax([2, -inf, 0.5])", ["H", "dH/dz0", "dH/dz1", "dH/dz2"], rows)
np.testing.assert_allclose(rows["jxent"], rows["exact (float64)"], rtol=1e-5, atol=1e-7)
print()

log_q = jax.nn.log_softmax(z)  # [-0.2, -inf, -1.7]
t = jnp.array([0.7, 0.0, 0.3])
rows = {}
for name, f in [("optax", optax.losses.kl_divergence), ("jxent", jxent.kl_divergence)]:
    value, grad = jax.value_and_grad(f)(log_q, t)
    rows[name] = [value, *grad]
t64 = np.array([0.7, 0.3])
rows["exact (float64)"] = [np.sum(t64 * (np.log(t64) - np.log(q))), -0.7, 0.0, -0.3]
table("KL(t || q), t = [0.7, 0, 0.3], q masked at class 1", ["KL", "d/dlogq0", "d/dlogq1",
                                                            "d/dlogq2"], rows)
np.testing.assert_allclose(rows["jxent"], rows["exact (float64)"], rtol=1e-5, atol=1e-7)

# %% [markdown]
# ## 4. bfloat16 round-off
#
# bfloat16 keeps 8 significant bits, about 2.4 decimal digits: around 10 its numbers
# are 0.0625 apart. Mixed-precision training keeps activations and logits in bfloat16,
# which halves their memory, but a loss computed *in* bfloat16 inherits that
# resolution: the per-token losses are rounded, the log-sum-exp over a 32k vocabulary
# is summed in bfloat16, and a mean over many tokens is rounded once more.
#
# jxent reads bfloat16 logits as they are and accumulates in float32 (no float32 copy
# of the logits is made), returns a float32 loss, and returns the gradient in bfloat16,
# the logits' dtype. Below, 256 tokens over a 32,000-word vocabulary, against the exact
# float64 loss *of the same bfloat16 logits*.

# %%
key_z, key_y = jax.random.split(jax.random.key(0))
logits = (3 * jax.random.normal(key_z, (256, 32000))).astype(jnp.bfloat16)
labels = jax.random.randint(key_y, (256,), 0, 32000)
exact = exact_xent(np.asarray(logits.astype(jnp.float32)), np.asarray(labels))


def naive_bf16(z, y):
    return -jnp.take_along_axis(jax.nn.log_softmax(z), y[:, None], -1)[:, 0]


rows = {}
for name, per_token in [
    ("naive log_softmax", naive_bf16(logits, labels)),
    ("optax", optax.losses.softmax_cross_entropy_with_integer_labels(logits, labels)),
    ("jxent", jxent.softmax_cross_entropy_with_integer_labels(logits, labels)),
]:
    err = np.abs(np.asarray(per_token, np.float64) - exact)
    rows[name] = [str(per_token.dtype), err.max(), err.mean(), per_token.mean()]
rows["exact (float64)"] = ["float64", 0.0, 0.0, exact.mean()]
print(f"{'':26}{'loss dtype':>12}{'max |error|':>14}{'mean |error|':>14}{'mean loss':>12}")
for name, (dtype, worst, mean_err, mean_loss) in rows.items():
    print(f"  {name:<24}{dtype:>12}{worst:14.2e}{mean_err:14.2e}{float(mean_loss):12.6f}")

loss_fn = lambda z: jxent.softmax_cross_entropy_with_integer_labels(z, labels, reduction="mean")
value, grad = jax.value_and_grad(loss_fn)(logits)
print(f"\njxent mean loss {float(value):.6f} ({value.dtype}); gradient dtype {grad.dtype}")
np.testing.assert_allclose(
    jxent.softmax_cross_entropy_with_integer_labels(logits, labels), exact, rtol=1e-6
)
np.testing.assert_allclose(value, exact.mean(), rtol=1e-6)
assert value.dtype == jnp.float32 and grad.dtype == jnp.bfloat16

# %% [markdown]
# Computed in bfloat16, the per-token losses are off by up to about 0.1 (0.03 on
# average) and their mean by about 0.016, the size of the improvements one watches for
# late in training; jxent's float32 accumulation agrees with the float64 answer to
# about seven digits.
#
# ## Summary
#
# | failure | naive formula | what jxent does |
# |---|---|---|
# | overflow / underflow in `exp` | `exp(z_y) / sum(exp(z))` | log-sum-exp with the max subtracted; the loss as a sum of non-negative terms |
# | `log(0)` | `log(softmax(z))`, `log(sigmoid(x))` | stays in log space: `lse - z_y`, `softplus(-x)`; probabilities clamped at `log >= -100` as PyTorch |
# | NaN from `-inf` logits | `0 * log(0)` in value and gradient | zero targets contribute exactly 0; fully masked rows give loss 0, gradient 0 |
# | bfloat16 round-off | loss computed and averaged in bfloat16 | bfloat16 read as is, accumulated in float32; float32 loss, bfloat16 gradient |
#
# All of these are tested against float64 NumPy references in `tests/`.
