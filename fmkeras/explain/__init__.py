"""Explanations of a finished run's predictions (`python -m fmkeras.explain`).

`attribution`: integrated gradients, gradient × input and attention rollout
over input embeddings; `explainers`: what each task explains (a class, an
entity, an output token); `report`: HTML, PNG and TensorBoard outputs;
`faithfulness`: ERASER comprehensiveness, sufficiency and deletion curves;
`command`: the command line.
"""

from fmkeras.explain.command import main  # noqa: F401  (`fmkeras explain ...`)
