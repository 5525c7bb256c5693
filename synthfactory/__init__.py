"""synthfactory: private, labelled medical images in; a differentially private, memorization-
audited synthetic labelled dataset out.

Stages (one module each): recipe → data → model → privacy/train → sample → audit → export.
The run directory (see `synthfactory.rundir`) is the contract between them.
"""

__version__ = "0.1.0"
