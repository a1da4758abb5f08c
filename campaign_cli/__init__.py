"""campaign-cli: send one campaign to a recipient list, safely, resumably and within budget."""

__version__ = "0.1.0"
