"""FAISS from whichever wheel the install chose: faiss-cpu (`make setup`, ``pip install -e '.[cpu]'``) or
faiss-gpu (`make setup GPU=1`, ``.[gpu]``). Both install the module ``faiss``, so only one may be
installed; without either, the stage that needs it says how to get it instead of a traceback."""

from pipeline.errors import UserError

try:
    import faiss  # noqa: F401  (re-exported)
except ImportError as e:
    raise UserError("FAISS is not installed in this environment: `make setup` installs faiss-cpu "
                    "(pip install -e '.[cpu]'), `make setup GPU=1` faiss-gpu on a CUDA machine "
                    "(pip install -e '.[gpu]')") from e
