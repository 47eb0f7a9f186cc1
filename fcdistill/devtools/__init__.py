"""Tools for developing fcdistill (test doubles, benchmark helpers); no pipeline stage imports them."""
