"""KL divergences between JacobianMVN and related distributions, registered with torch."""
