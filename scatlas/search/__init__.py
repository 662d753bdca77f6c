"""Cell index and search (IVF through faiss, native CuPy IVF, exact search): later issues."""
