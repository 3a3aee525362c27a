// The hit experts of a batch of rows grouped by expert, shared by the GEMV kernels (quant_kernels.cpp) and the
// tile GEMMs (tile_gemm.cpp).
#ifndef LONGCAT_HITS_H
#define LONGCAT_HITS_H
#include <torch/extension.h>

#include <vector>

// The hit experts of a grouped batch: rows start[h]..start[h]+n[h] of x belong to expert id[h].
struct Hits {
  std::vector<int64_t> start, n, id;
  void add(int64_t e, int64_t rows) {  // the next `rows` rows go to expert e
    if (rows) start.push_back(rows_total()), n.push_back(rows), id.push_back(e);
  }
  int64_t rows_total() const { return start.empty() ? 0 : start.back() + n.back(); }
  int64_t size() const { return static_cast<int64_t>(id.size()); }
  // From counts (E,) rows per expert; without counts, the weight is one plain matrix and all `rows` rows of x go
  // through it (a linear layer).
  static Hits of(const c10::optional<torch::Tensor>& counts, int64_t rows) {
    Hits hits;
    if (!counts) {
      hits.add(0, rows);
      return hits;
    }
    auto c = counts->to(torch::kLong).contiguous();
    for (int64_t e = 0; e < c.numel(); ++e) hits.add(e, c.data_ptr<int64_t>()[e]);
    return hits;
  }
};
// An entry point's rows and output: x (R, I) rows grouped by counts, or without counts x (..., I) through one
// plain weight; `rows` is x as (R, I) contiguous, `out` zeros (..., O) in x's dtype and `y` the same as (R, O).
struct Batch {
  torch::Tensor rows, out, y;
  Hits hits;
  Batch(const torch::Tensor& x, const c10::optional<torch::Tensor>& counts, int64_t O) {
    TORCH_CHECK(!counts || x.dim() == 2, "rows grouped by counts must be (R, I)");
    auto shape = x.sizes().vec();
    shape.back() = O;
    rows = x.reshape({-1, x.size(-1)}).contiguous();
    out = torch::zeros(shape, x.options());
    y = out.view({-1, O});
    hits = Hits::of(counts, rows.size(0));
  }
};
#endif  // LONGCAT_HITS_H
