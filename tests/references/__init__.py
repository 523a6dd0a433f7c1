"""The literal, slow references of every method, one module per method (``references.<method>``).

Each function follows its source (the paper's equations or the public code it names) term by term, with
Python loops over images, instances, levels, channels and cells, nothing vectorised, so that the library's
vectorised code can be checked against it; the tests (``tests/test_<method>.py``, ``test_weight_maps.py``)
import them from here. ``liaf`` (LIAF-KD, paper Eq. 2-9), ``fitnet``, ``maskd``, ``fgd``, ``mgd``, ``acam``,
``ima``, ``samkd``, ``fgfi``, ``defeat``, ``gid``, ``pkd``, ``cwd``, ``ld``, ``bckd``, ``crosskd``; ``gfl`` the
GFL detector's assignment and losses; ``common`` the pieces several methods share (projector, sigmoid, IoU).
"""
