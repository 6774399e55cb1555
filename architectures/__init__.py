"""What the suite knows about MoE architectures: the family table and one view of an MoE block.

`FAMILIES` / `family_of(config)` (architectures.families) say how each family routes and which methods are
refused on it; `moe_blocks(model)` (architectures.blocks) gives the compressors and the observer one view of
every block's experts and router, whatever the layout. Imports no heavy library at import time.
"""

from architectures.blocks import MoEBlock, moe_blocks
from architectures.families import FAMILIES, Family, family_of

__all__ = ["FAMILIES", "Family", "MoEBlock", "family_of", "moe_blocks"]
