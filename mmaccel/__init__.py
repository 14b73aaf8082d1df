"""mmaccel: fast multimodal understanding and visual generation on transformers / diffusers models.

One import name over the repository's product folders, mapped at install time
(``pyproject.toml``'s ``package-dir``):

=========================  ======================  ==============================================
import                     folder                  what
=========================  ======================  ==============================================
``mmaccel.runtime``        ``runtime/``            budgets, patches, timesteps, model adapters, ranks
``mmaccel.vlm``            ``vlm/``                HiRED, VISTA, attention rebalancing, ``load_vlm``
``mmaccel.diffusion``      ``diffusion/``          token density, FlexDiT
``mmaccel.sparse_attn``    ``sparse_attn/``        SVG2 semantic sparse attention
``mmaccel.parallel_video`` ``parallel_video/``     clip parallelism, the DualParal layer pipeline
``mmaccel.tokenizers_img`` ``tokenizers_img/``     VQ / 1-D tokenizers, raster and NAR decoding
``mmaccel.apps``           ``apps/``               the ``mmaccel`` CLI, the demo, the zoo
``mmaccel.benchmarks``     ``benchmarks/``         one script per technique
``mmaccel.testing``        ``mmaccel/testing/``    tiny random models, the contract check
=========================  ======================  ==============================================
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mmaccel")
except PackageNotFoundError:  # pragma: no cover - running from a tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
