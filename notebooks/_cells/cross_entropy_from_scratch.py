# %% [markdown]
# # Cross-entropy from scratch
#
# This notebook builds the cross-entropy loss up from its pieces: entropy,
# cross-entropy and the Kullback-Leibler divergence; why `-log q` punishes confident
# mistakes; the softmax and its famously simple gradient `softmax - onehot`; integer
# (sparse) versus distribution (dense) labels; and label smoothing, with its effect on
# the target and on calibration.
#
# Every idea is computed twice: with [jxent](../README.md) and with a plain NumPy
# formula in float64. The `np.testing` assertions make this notebook a test: the test
# suite re-executes it, and it fails if the two ever disagree.

# %%
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import jxent

plt.rcParams.update({"figure.dpi": 80, "figure.figsize": (6.4, 3.2), "axes.grid": True})
np.set_printoptions(precision=4, suppress=True)
print("jax", jax.__version__, "| jxent", jxent.__version__, "| backend", jax.default_backend())

# %% [markdown]
# ## 1. Entropy: the average surprise
#
# An outcome of probability $p$ carries a *surprise* of $-\log p$ nats: a certain
# outcome (p = 1) none, a 1-in-100 outcome $\log 100 \approx 4.6$. The **entropy** of a
# distribution is its expected surprise,
#
# $$H(p) = -\sum_k p_k \log p_k ,$$
#
# with the convention $0 \log 0 = 0$ (impossible outcomes never happen, so they add no
# surprise). It is 0 for a certain outcome and largest, $\log K$, for the uniform
# distribution over $K$ outcomes.
#
# `jxent.entropy` takes *logits* (any vector whose softmax is $p$); $\log p$ is one
# such vector, and its $-\infty$ entries mark impossible classes.

# %%
def np_entropy(p):
    """H(p) = -sum p log p, with 0 log 0 = 0, in float64."""
    p = np.asarray(p, np.float64)
    safe = np.where(p > 0, p, 1.0)
    return 0.0 - np.sum(np.where(p > 0, p * np.log(safe), 0.0), axis=-1)


def np_log(p):
    """log p with log 0 = -inf, without a warning."""
    with np.errstate(divide="ignore"):
        return np.log(np.asarray(p, np.float64))


dists = np.array(
    [
        [0.25, 0.25, 0.25, 0.25],  # uniform: the most uncertain
        [0.70, 0.10, 0.10, 0.10],
        [0.97, 0.01, 0.01, 0.01],
        [1.00, 0.00, 0.00, 0.00],  # certain: no surprise at all
    ]
)
h_jxent = jxent.entropy(np_log(dists))
h_numpy = np_entropy(dists)
for p, hj, hn in zip(dists, h_jxent, h_numpy):
    print(f"p = {p}   H jxent = {float(hj):.6f}   H NumPy = {hn:.6f}")
print(f"log 4 = {np.log(4):.6f}")

np.testing.assert_allclose(h_jxent, h_numpy, rtol=1e-6, atol=1e-7)
np.testing.assert_allclose(h_numpy[0], np.log(4))

# %% [markdown]
# ## 2. Cross-entropy and the KL divergence
#
# If outcomes come from $p$ but we *expect* them with a model $q$, our average surprise
# is the **cross-entropy**
#
# $$H(p, q) = -\sum_k p_k \log q_k .$$
#
# It is never below $H(p)$; the excess is the **Kullback-Leibler divergence**
#
# $$\mathrm{KL}(p \,\|\, q) = \sum_k p_k \log \frac{p_k}{q_k} \ \ge 0,
# \qquad H(p, q) = H(p) + \mathrm{KL}(p \,\|\, q).$$
#
# With fixed targets $p$, $H(p)$ is a constant: minimising the cross-entropy *is*
# minimising the KL divergence from the targets to the model.
#
# In jxent (as in optax), `softmax_cross_entropy(logits, p)` takes the model's
# logits, $q = \mathrm{softmax}(\text{logits})$, and `kl_divergence(log_q, p)` takes
# the model's log-probabilities.

# %%
def np_cross_entropy(p, q):
    p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
    with np.errstate(invalid="ignore"):  # 0 * log 0 = nan, dropped by the where
        terms = p * np_log(q)
    return 0.0 - np.sum(np.where(p > 0, terms, 0.0), axis=-1)


def np_kl(p, q):
    p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
    with np.errstate(invalid="ignore"):
        terms = p * (np_log(p) - np_log(q))
    return np.sum(np.where(p > 0, terms, 0.0), axis=-1)


p = np.array([0.5, 0.3, 0.2, 0.0])
q = np.array([0.4, 0.4, 0.1, 0.1])

ce = jxent.softmax_cross_entropy(np_log(q), p)  # logits log q: softmax gives back q
kl = jxent.kl_divergence(np_log(q), p)
h = jxent.entropy(np_log(p))
print(f"H(p)       jxent {float(h):.6f}   NumPy {np_entropy(p):.6f}")
print(f"KL(p || q) jxent {float(kl):.6f}   NumPy {np_kl(p, q):.6f}")
print(f"H(p, q)    jxent {float(ce):.6f}   NumPy {np_cross_entropy(p, q):.6f}")
print(f"H(p) + KL  = {float(h + kl):.6f}")

np.testing.assert_allclose(ce, np_cross_entropy(p, q), rtol=1e-6)
np.testing.assert_allclose(kl, np_kl(p, q), rtol=1e-5)
np.testing.assert_allclose(ce, h + kl, rtol=1e-6)  # H(p, q) = H(p) + KL(p || q)

# %% [markdown]
# The identity holds for any pair, not just this one: check it on a thousand random
# pairs of distributions over 10 classes. Note also that KL is **not symmetric**:
# $\mathrm{KL}(q \,\|\, p)$ is infinite here, because $q$ gives probability to an
# outcome (the last) that $p$ calls impossible.

# %%
rng = np.random.default_rng(0)
ps = rng.dirichlet(np.ones(10), size=1000)
qs = rng.dirichlet(np.ones(10), size=1000)
ce_many = jxent.softmax_cross_entropy(np.log(qs), ps)
identity_gap = ce_many - (jxent.entropy(np.log(ps)) + jxent.kl_divergence(np.log(qs), ps))
print("largest |H(p,q) - H(p) - KL(p||q)| over 1000 pairs:", float(jnp.max(jnp.abs(identity_gap))))
np.testing.assert_allclose(ce_many, np_cross_entropy(ps, qs), rtol=1e-5)
np.testing.assert_allclose(identity_gap, 0.0, atol=1e-5)
assert np.all(np.asarray(jxent.kl_divergence(np.log(qs), ps)) >= 0)

kl_reverse = jxent.kl_divergence(np_log(p), q)
print("KL(p || q) =", float(kl), "  KL(q || p) =", float(kl_reverse))
assert np.isinf(kl_reverse)

# %% [markdown]
# ## 3. Why `-log q` punishes confident mistakes
#
# For one example with true class $y$ the target is one-hot, and the cross-entropy is
# just $-\log q_y$: the surprise at the right answer. Giving the right class 0.9 costs
# 0.105; 0.5 costs 0.69; 0.01 costs 4.6; and the cost grows without bound as
# $q_y \to 0$. So does its slope, $-1/q_y$: a model that is confidently wrong gets a
# large push. The squared error $(1 - q_y)^2$, by contrast, never exceeds 1 and its
# slope never exceeds 2, so a confident mistake barely registers.
#
# Binary cross-entropy is the two-class case. With predicted probability $p$ of the
# positive class, the loss is $-\log p$ for a positive label and $-\log(1 - p)$ for a
# negative one: each curve explodes where the prediction is confidently wrong.

# %%
q_grid = np.linspace(0.005, 0.995, 400)
probs = jnp.asarray(q_grid, jnp.float32)
bce_pos = jxent.binary_cross_entropy(probs, jnp.ones_like(probs))
bce_neg = jxent.binary_cross_entropy(probs, jnp.zeros_like(probs))
np.testing.assert_allclose(bce_pos, -np.log(q_grid), rtol=1e-5, atol=1e-6)
np.testing.assert_allclose(bce_neg, -np_log(1 - q_grid), rtol=1e-4, atol=1e-6)

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
ax1.plot(q_grid, -np.log(q_grid), label=r"cross-entropy $-\log q_y$")
ax1.plot(q_grid, (1 - q_grid) ** 2, label=r"squared error $(1 - q_y)^2$")
ax1.set(xlabel="probability given to the true class $q_y$", ylabel="loss", ylim=(0, 5.5))
ax1.legend()
ax2.plot(q_grid, bce_pos, label="label 1: $-\\log p$")
ax2.plot(q_grid, bce_neg, label="label 0: $-\\log(1 - p)$")
ax2.set(xlabel="predicted probability of class 1, $p$", ylabel="binary cross-entropy",
        ylim=(0, 5.5))
ax2.legend()
fig.tight_layout()
plt.show()

for qy in (0.99, 0.9, 0.5, 0.1, 0.01, 0.001):
    print(f"q_y = {qy:<6} cross-entropy {-np.log(qy):7.3f}   squared error {(1 - qy) ** 2:.3f}")

# %% [markdown]
# ## 4. Softmax and its gradient, `softmax - onehot`
#
# A classifier outputs **logits** $z$, turned into probabilities by the softmax
# $q_k = e^{z_k} / \sum_j e^{z_j}$. The cross-entropy with an integer label $y$ is then
#
# $$\ell(z) = -\log q_y = \log \sum_j e^{z_j} - z_y ,$$
#
# the log-sum-exp minus the correct logit, and its gradient is
#
# $$\frac{\partial \ell}{\partial z_k} = q_k - [k = y] ,$$
#
# `softmax - onehot`: the correct logit is pushed up by $1 - q_y$, every other logit
# down by its own probability, and the gradient sums to zero. Below, `jax.grad` of the
# jxent loss is compared with this formula and with central finite differences of a
# float64 NumPy implementation.

# %%
z = np.array([2.0, 1.0, 0.1, -1.0])
y = 0


def np_softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def np_xent(z, y):
    return np.log(np.sum(np.exp(z))) - z[y]


loss, grad = jax.value_and_grad(jxent.softmax_cross_entropy_with_integer_labels)(
    jnp.asarray(z, jnp.float32), y
)
formula = np_softmax(z) - np.eye(4)[y]
eps = 1e-6
finite_diff = np.array(
    [(np_xent(z + eps * e, y) - np_xent(z - eps * e, y)) / (2 * eps) for e in np.eye(4)]
)
print("softmax(z)        ", np_softmax(z))
print("jax.grad of jxent ", np.asarray(grad))
print("softmax - onehot  ", formula)
print("finite differences", finite_diff)
print("loss", float(loss), "=", np_xent(z, y), "; gradient sums to", float(grad.sum()))

np.testing.assert_allclose(loss, np_xent(z, y), rtol=1e-6)
np.testing.assert_allclose(grad, formula, atol=1e-6)
np.testing.assert_allclose(grad, finite_diff, atol=1e-6)
np.testing.assert_allclose(grad.sum(), 0.0, atol=1e-6)

# %% [markdown]
# ## 5. Sparse (integer) versus dense (distribution) labels
#
# Labels come in two forms. **Sparse**: one integer class per example,
# `softmax_cross_entropy_with_integer_labels(logits, labels)`. **Dense**: a target
# distribution per example, `softmax_cross_entropy(logits, targets)`. For hard labels
# they are the same number, but the dense form also takes *soft* targets: a teacher's
# probabilities, mixup's blends, smoothed labels. The loss is linear in the targets,
# so a 70/30 blend of two labels costs 70/30 of their two losses.
#
# Prefer the sparse form whenever labels are hard: jxent never builds the one-hot
# array, which for a language model is large: 8192 tokens times Llama-3's 128,256-word
# vocabulary is a 4 GiB float32 one-hot.

# %%
logits = jax.random.normal(jax.random.key(1), (5, 6)) * 2
labels = jnp.array([0, 3, 5, 1, 1])
sparse = jxent.softmax_cross_entropy_with_integer_labels(logits, labels)
dense = jxent.softmax_cross_entropy(logits, jax.nn.one_hot(labels, 6))
z64 = np.asarray(logits, np.float64)
log_q = z64 - z64.max(-1, keepdims=True)
log_q -= np.log(np.exp(log_q).sum(-1, keepdims=True))
reference = -log_q[np.arange(5), np.asarray(labels)]
print("sparse   ", np.asarray(sparse))
print("dense    ", np.asarray(dense))
print("NumPy    ", reference)
np.testing.assert_allclose(sparse, reference, rtol=1e-6)
np.testing.assert_allclose(dense, reference, rtol=1e-6)

other = jnp.array([2, 2, 0, 4, 5])
blend = 0.7 * jax.nn.one_hot(labels, 6) + 0.3 * jax.nn.one_hot(other, 6)
mixed = jxent.softmax_cross_entropy(logits, blend)
print("blended  ", np.asarray(mixed))
np.testing.assert_allclose(mixed, -(np.asarray(blend, np.float64) * log_q).sum(-1), rtol=1e-6)
np.testing.assert_allclose(
    mixed,
    0.7 * sparse + 0.3 * jxent.softmax_cross_entropy_with_integer_labels(logits, other),
    rtol=1e-6,
)
print(f"a float32 one-hot of 8192 x 128256: {8192 * 128256 * 4 / 2**30:.1f} GiB")

# %% [markdown]
# ## 6. Label smoothing: a softer target
#
# With a one-hot target the loss $\log(e^{m} + K - 1) - m$ (for a correct logit $m$
# above $K - 1$ zeros) keeps falling as the margin $m$ grows: the optimum is at
# infinity, and training rewards ever larger logits, i.e. ever more confident
# predictions. **Label smoothing** (Szegedy et al., 2016) mixes the one-hot target
# with the uniform distribution,
#
# $$t' = (1 - \alpha)\, \mathrm{onehot}(y) + \alpha / K ,$$
#
# and now the best prediction is $q = t'$, reached at the finite margin
# $m^\star = \log\!\big(K (1 - \alpha + \alpha/K) / \alpha\big)$, where the loss equals
# $H(t')$. jxent's `label_smoothing=` option computes this without building $t'$;
# `smooth_labels` builds it (as optax does) for dense targets.

# %%
K, alpha = 10, 0.1
onehot = np.eye(K)[3]
smoothed_np = (1 - alpha) * onehot + alpha / K
smoothed = jxent.smooth_labels(jnp.asarray(onehot, jnp.float32), alpha)
print("smoothed target:", np.asarray(smoothed))
np.testing.assert_allclose(smoothed, smoothed_np, rtol=1e-6)
np.testing.assert_allclose(
    optax.losses.smooth_labels(jnp.asarray(onehot, jnp.float32), alpha), smoothed, rtol=1e-6
)

# The integer-label option equals the dense loss against the smoothed target.
logits = jax.random.normal(jax.random.key(2), (4, K))
labels = jnp.array([3, 0, 9, 3])
opt_sparse = jxent.softmax_cross_entropy_with_integer_labels(logits, labels, label_smoothing=alpha)
opt_dense = jxent.softmax_cross_entropy(logits, jxent.smooth_labels(jax.nn.one_hot(labels, K), alpha))
np.testing.assert_allclose(opt_sparse, opt_dense, rtol=1e-6)

margins = np.linspace(0, 12, 241)
z_grid = np.zeros((margins.size, K))
z_grid[:, 0] = margins
fig, ax = plt.subplots()
for a in (0.0, 0.1, 0.2):
    curve = jxent.softmax_cross_entropy_with_integer_labels(
        jnp.asarray(z_grid, jnp.float32), jnp.zeros(margins.size, jnp.int32), label_smoothing=a
    )
    line, = ax.plot(margins, curve, label=f"alpha = {a}")
    if a > 0:
        m_star = np.log(K * (1 - a + a / K) / a)
        target = (1 - a) * np.eye(K)[0] + a / K
        ax.axvline(m_star, color=line.get_color(), ls=":")
        best = margins[np.argmin(curve)]
        print(f"alpha = {a}: loss is smallest at margin {best:.2f}; m* = {m_star:.3f}; "
              f"min loss {float(curve.min()):.4f}, H(t') = {np_entropy(target):.4f}")
        assert abs(best - m_star) <= margins[1] - margins[0]
        np.testing.assert_allclose(curve.min(), np_entropy(target), rtol=1e-4)
ax.set(xlabel="margin m of the correct logit over the others", ylabel="loss", ylim=(0, 2.5),
       title=f"K = {K}: with smoothing the optimum is finite (dotted: m*)")
ax.legend()
plt.show()

# %% [markdown]
# ### Smoothing and calibration
#
# A model is *calibrated* when its confidence matches its accuracy: of the predictions
# made with 80% confidence, 80% are right. Without smoothing, a model that can fit its
# training set perfectly drives its logits up and becomes overconfident on new data
# (Guo et al., 2017); smoothing caps the confidence it is rewarded for (Müller et al.,
# 2019).
#
# A small experiment: 4 overlapping Gaussian classes in 40 dimensions, only 80
# training examples, a linear softmax classifier trained with Adam on jxent's loss at
# three smoothing levels. The **expected calibration error** (ECE) bins the test
# predictions by confidence and averages |accuracy - confidence| over the bins,
# weighted by their size.

# %%
rng = np.random.default_rng(0)
n_classes, dim = 4, 40
centres = rng.normal(size=(n_classes, dim)) * 0.35


def sample(n):
    y = rng.integers(0, n_classes, n)
    return (centres[y] + rng.normal(size=(n, dim))).astype(np.float32), y


x_train, y_train = sample(80)
x_test, y_test = sample(2000)


def train(alpha, steps=500):
    params = (jnp.zeros((dim, n_classes)), jnp.zeros(n_classes))
    opt = optax.adam(0.05)
    state = opt.init(params)

    def loss_fn(params):
        logits = x_train @ params[0] + params[1]
        return jxent.softmax_cross_entropy_with_integer_labels(
            logits, y_train, label_smoothing=alpha, reduction="mean"
        )

    @jax.jit
    def step(params, state):
        grads = jax.grad(loss_fn)(params)
        updates, state = opt.update(grads, state)
        return optax.apply_updates(params, updates), state

    for _ in range(steps):
        params, state = step(params, state)
    return params


def expected_calibration_error(probs, y, bins=10):
    confidence, correct = probs.max(1), probs.argmax(1) == y
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (confidence > lo) & (confidence <= hi)
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return ece


results = {}
fig, ax = plt.subplots(figsize=(4.5, 4))
ax.plot([0, 1], [0, 1], "k:", label="perfect calibration")
for a in (0.0, 0.1, 0.2):
    w, b = train(a)
    probs = np_softmax(x_test.astype(np.float64) @ np.asarray(w, np.float64) + np.asarray(b))
    train_acc = np.mean(np.argmax(x_train @ np.asarray(w) + np.asarray(b), 1) == y_train)
    results[a] = dict(
        train_acc=train_acc,
        test_acc=np.mean(probs.argmax(1) == y_test),
        confidence=probs.max(1).mean(),
        ece=expected_calibration_error(probs, y_test),
    )
    confidence, correct = probs.max(1), probs.argmax(1) == y_test
    edges = np.linspace(0.25, 1, 7)
    idx = np.digitize(confidence, edges[1:-1])
    centres_ = [confidence[idx == i].mean() for i in range(6) if (idx == i).sum() > 20]
    accs = [correct[idx == i].mean() for i in range(6) if (idx == i).sum() > 20]
    ax.plot(centres_, accs, "o-", label=f"alpha = {a}")
ax.set(xlabel="confidence", ylabel="accuracy", title="reliability on the test set")
ax.legend(fontsize=8)
plt.show()

print("alpha  train acc  test acc  mean confidence   ECE")
for a, r in results.items():
    print(f"{a:5}  {r['train_acc']:9.2f}  {r['test_acc']:8.3f}  {r['confidence']:15.3f}  "
          f"{r['ece']:.3f}")
assert results[0.0]["train_acc"] == 1.0  # the unsmoothed model fits its training set
assert results[0.0]["confidence"] > results[0.2]["confidence"]
assert results[0.0]["ece"] > results[0.2]["ece"]

# %% [markdown]
# Without smoothing the model fits its training set perfectly and is about 93% confident
# on test examples it gets right only about two times in three. Smoothing pulls the
# confidence down towards the accuracy and the calibration error falls several-fold.
# (How much smoothing is right depends on the problem; too much makes a model
# under-confident.)
#
# ## Summary
#
# | idea | formula | jxent |
# |---|---|---|
# | entropy | $H(p) = -\sum p \log p$ | `entropy(logits)` |
# | cross-entropy | $H(p, q) = H(p) + \mathrm{KL}(p\,\|\,q)$ | `softmax_cross_entropy(logits, targets)` |
# | KL divergence | $\sum p \log(p / q)$ | `kl_divergence(log_q, p)`, `softmax_kl_divergence(student, teacher)` |
# | hard labels | $\log\sum e^{z} - z_y$, gradient `softmax - onehot` | `softmax_cross_entropy_with_integer_labels(logits, labels)` |
# | binary | $-t \log p - (1 - t) \log (1 - p)$ | `sigmoid_binary_cross_entropy(logits, labels)`, `binary_cross_entropy(probs, labels)` |
# | label smoothing | $t' = (1 - \alpha)\,\mathrm{onehot} + \alpha / K$ | `label_smoothing=alpha`, `smooth_labels` |
#
# Next: [stability.ipynb](stability.ipynb) shows what goes wrong when these formulas
# are computed naively in floating point, and how jxent avoids it.
