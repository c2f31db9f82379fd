"""Progress bars: the widget in a Jupyter kernel that can draw one, the text bar everywhere else.

`tqdm.auto` alone would pick the notebook widget inside any kernel and, where ipywidgets is not
installed, warn "IProgress not found" the moment it is imported: the first thing a notebook that imports
fastdit would print. The widget is chosen only where ipywidgets can be imported.
"""

from __future__ import annotations

import importlib.util
import sys


def _bar_class():
    if "ipykernel" in sys.modules and importlib.util.find_spec("ipywidgets") is not None:
        from tqdm.auto import tqdm
    else:
        from tqdm.std import tqdm
    return tqdm


tqdm = _bar_class()
