"""Device profiles (data, with sources) and projections for ``edgemerge plan``."""
