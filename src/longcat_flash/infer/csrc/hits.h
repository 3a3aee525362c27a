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
#endif  // LONGCAT_HITS_H
