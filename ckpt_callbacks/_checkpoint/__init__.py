"""One checkpoint on storage: write its data files and index, read and verify them back."""
