"""The paper's factorized convolution (Tai et al., ICLR 2016, section 3):

- svd.py: the exact decomposition — a kernel W (N×C×kh×kw) unfolded to M[(c,i),(j,n)] = W[n,c,i,j],
  its truncated SVD the global optimum of rank K (Eckart–Young), split into a vertical kh×1 conv
  (C→K) and a horizontal 1×kw conv (K→N);
- ranks.py: how K is chosen per layer (explicit ranks, a MAC speedup, an energy fraction) and the
  MAC counts behind it, N·C·kh·kw dense against K·(C·kh + N·kw) factorized;
- layers.py: LowRankConv2d, the pair of convs as one module (from a dense conv, back to one,
  re-projected onto rank K); LowRankLinear, a fully-connected layer W (out×in) as U·V by the
  truncated SVD (svd.decompose_linear: a linear layer is a 1×1 conv, Eckart–Young again).

Nothing is imported here: `from lowrank_dist import LowRankConv2d, decompose_kernel` is the short way."""
