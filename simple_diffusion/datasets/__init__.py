"""TFDS builders defined in this project; importing the package registers them.

``LOCAL_BUILDERS`` names the builders that prepare from files already on this
machine in seconds, so the input pipeline prepares them on first use instead
of asking the user to.
"""

from simple_diffusion.datasets import fashion_mnist_local

LOCAL_BUILDERS = frozenset({"fashion_mnist_local"})
