"""Flax NNX models of the example tasks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class MLPClassifier(nnx.Module):
    """A multilayer perceptron: ``depth`` hidden GELU layers of width ``hidden``.

    Maps ``[batch, num_inputs]`` to ``[batch, num_outputs]`` logits.
    """

    def __init__(
        self, num_inputs: int, num_outputs: int, *, hidden: int, depth: int, rngs: nnx.Rngs
    ):
        widths = [num_inputs] + [hidden] * depth
        self.hidden = nnx.List(
            [nnx.Linear(a, b, rngs=rngs) for a, b in zip(widths[:-1], widths[1:], strict=True)]
        )
        self.norms = nnx.List([nnx.LayerNorm(b, rngs=rngs) for b in widths[1:]])
        self.out = nnx.Linear(widths[-1], num_outputs, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer, norm in zip(self.hidden, self.norms, strict=True):
            x = nnx.gelu(norm(layer(x)))
        return self.out(x)


class CausalSelfAttention(nnx.Module):
    """Multi-head causal self-attention with a fused query/key/value projection."""

    def __init__(self, d_model: int, num_heads: int, *, rngs: nnx.Rngs):
        if d_model % num_heads:
            raise ValueError(f"d_model ({d_model}) must be a multiple of num_heads ({num_heads})")
        self.num_heads = num_heads
        self.qkv = nnx.Linear(d_model, 3 * d_model, use_bias=False, rngs=rngs)
        self.proj = nnx.Linear(d_model, d_model, use_bias=False, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        batch, length, d_model = x.shape
        qkv = self.qkv(x).reshape(batch, length, 3, self.num_heads, d_model // self.num_heads)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        y = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.reshape(batch, length, d_model))


class Block(nnx.Module):
    """A pre-norm transformer block: attention and a 4x GELU MLP, each residual."""

    def __init__(self, d_model: int, num_heads: int, *, rngs: nnx.Rngs):
        self.attn_norm = nnx.LayerNorm(d_model, rngs=rngs)
        self.attn = CausalSelfAttention(d_model, num_heads, rngs=rngs)
        self.mlp_norm = nnx.LayerNorm(d_model, rngs=rngs)
        self.mlp_in = nnx.Linear(d_model, 4 * d_model, rngs=rngs)
        self.mlp_out = nnx.Linear(4 * d_model, d_model, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp_out(nnx.gelu(self.mlp_in(self.mlp_norm(x))))


class ByteTransformer(nnx.Module):
    """A decoder-only transformer over bytes with learned positions and tied embeddings.

    ``model(tokens)`` maps ``[batch, length]`` int tokens to the final hidden states
    ``[batch, length, d_model]``; the logits are ``hidden @ model.unembedding()``,
    which training never forms: it feeds the hidden states and the unembedding to
    :func:`jxent.linear_softmax_cross_entropy`.
    """

    def __init__(
        self,
        vocab_size: int,
        max_len: int,
        *,
        d_model: int,
        num_layers: int,
        num_heads: int,
        rngs: nnx.Rngs,
    ):
        init = nnx.initializers.normal(0.02)
        self.embed = nnx.Embed(vocab_size, d_model, embedding_init=init, rngs=rngs)
        self.pos = nnx.Param(init(rngs.params(), (max_len, d_model), jnp.float32))
        self.blocks = nnx.List([Block(d_model, num_heads, rngs=rngs) for _ in range(num_layers)])
        self.final_norm = nnx.LayerNorm(d_model, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        length = tokens.shape[-1]
        x = self.embed(tokens) + self.pos[...][:length][None]
        for block in self.blocks:
            x = block(x)
        return self.final_norm(x)

    def unembedding(self) -> jax.Array:
        """The output projection ``[d_model, vocab_size]`` (the transposed embedding)."""
        return self.embed.embedding[...].T

    def logits(self, tokens: jax.Array) -> jax.Array:
        """Full next-byte logits ``[batch, length, vocab_size]`` (for sampling)."""
        return self(tokens) @ self.unembedding()


def count_params(model: nnx.Module) -> int:
    """The number of trainable parameters."""
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
