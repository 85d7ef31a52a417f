"""ShardedLayout: the three layout boundaries of `models.layout.Layout` on a mesh.

comm="xla": each boundary is a sharding constraint resolved by the mode's rules table; GSPMD
inserts the collectives. Per block and mode (tokens T, width D, tp devices):

  boundary          sp="off" (residual In[T, D])      sp="on" (residual In[T_tp, D])
  column(x, ...)    nothing (x is replicated)         all-gather T      -> In[T, D]
  row(spec, h, w)   all-reduce of partial sums        reduce-scatter T  -> Out[T_tp, D]
  residual(x)       replicated                        token-sharded

so an SP block runs reduce-scatter -> RMSNorm on T/tp rows -> all-gather where TP all-reduces.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from sharding.rules import RULES, named


@dataclasses.dataclass(frozen=True, eq=False)
class ShardedLayout:
    mesh: Mesh
    sp: bool
    comm: str = "xla"

    @property
    def rules(self):
        return RULES["on" if self.sp else "off"]

    def _constrain(self, x, names):
        return jax.lax.with_sharding_constraint(x, named(self.mesh, names, self.rules))

    def residual(self, x_td):
        return self._constrain(x_td, ("act_tokens", "act_embed"))

    def column(self, x_td, *projections):
        x_td = self._constrain(x_td, ("act_gathered", "act_embed"))
        return [jnp.einsum(spec, x_td, w) for spec, w in projections]

    def row(self, spec, h, w):
        return self.residual(jnp.einsum(spec, h, w))
