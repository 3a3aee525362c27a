// Whole decode blocks in one call each: FusedMLA's two halves, FusedMLP and a whole layer (FusedScMoELayer; fused.py),
// through the same kernels the Python twins call one by one, without the Python between them (~25 calls a layer at
// a few microseconds each). Python side: decode_ops.py.
#include <cstring>
#include <map>
#include <string>

#include "hits.h"
#include "simd.h"

// From the other files of this module (one translation unit; extension.py).
static void experts_into(const Hits& hits, torch::Tensor x, const std::vector<torch::Tensor>& w, torch::Tensor y);
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps);
torch::Tensor swiglu(torch::Tensor h_in);
torch::Tensor rope(torch::Tensor x_in, torch::Tensor cos, torch::Tensor sin);
torch::Tensor absorbed_attention(torch::Tensor q_nope_in, torch::Tensor q_rope_in, torch::Tensor latent_in,
                                 torch::Tensor k_rope_in, torch::Tensor mask, torch::Tensor w_uk, torch::Tensor w_uv_t,
                                 double scale, c10::optional<torch::Tensor> read);
torch::Tensor moe_experts(torch::Tensor x, torch::Tensor ids, torch::Tensor weights, int64_t n_ffn, bool identity,
                          std::vector<torch::Tensor> gate_up, std::vector<torch::Tensor> down, int64_t max_rows);

// x (..., I) -> (..., O) through one linear weight in any format experts_into takes: (w) plain in x's dtype,
// (values, scales) int8/fp8 blocks, (packed, scales, mins) int4 groups.
static torch::Tensor linear(const torch::Tensor& x, const std::vector<torch::Tensor>& w) {
  TORCH_CHECK(!w.empty() && w.size() <= 3 && w[0].dim() == 2, "linear: a weight is 1 to 3 tensors, (O, ...) first");
  Batch b(x, c10::nullopt, w[0].size(0));
  experts_into(b.hits, b.rows, w, b.y);
  return b.out;
}

// FusedMLA.project: x (B, S, D) -> q_nope (B, S, H, N), q_rope (B, S, H, R) rotated, latent (B, S, C) normed,
// k_rope (B, S, R) rotated. qkv_a (Q + C + R rows: q first) and q_b (H * (N + R) rows) are linear weights; q_norm
// (Q,) and kv_norm (C,) RMSNorm weights; cos/sin (B * S, R/2).
std::vector<torch::Tensor> mla_project(torch::Tensor x, std::vector<torch::Tensor> qkv_a, torch::Tensor q_norm,
                                       double q_eps, std::vector<torch::Tensor> q_b, torch::Tensor kv_norm,
                                       double kv_eps, torch::Tensor cos, torch::Tensor sin, int64_t H) {
  const int64_t Q = q_norm.size(0), C = kv_norm.size(0), R = cos.size(-1) * 2;
  TORCH_CHECK(x.dim() == 3, "mla_project: x must be (B, S, D)");
  const auto qkv = linear(x, qkv_a);  // (B, S, Q + C + R)
  TORCH_CHECK(qkv.size(-1) == Q + C + R, "mla_project: qkv_a's rows are not q_lora_rank + kv_lora_rank + rope dim");
  const auto q_a = rms_norm(qkv.narrow(-1, 0, Q), q_norm, q_eps);  // (B, S, Q), read in place
  const auto q = linear(q_a, q_b).view({x.size(0), x.size(1), H, -1});  // (B, S, H, N + R)
  const int64_t N = q.size(-1) - R;
  return {q.narrow(-1, 0, N), rope(q.narrow(-1, N, R), cos, sin),
          rms_norm(qkv.narrow(-1, Q, C), kv_norm, kv_eps), rope(qkv.narrow(-1, Q + C, R), cos, sin)};
}

// pool[write[r]] = [latent[r] | k_rope[r]] for the B*S new rows, as BatchView.store writes them (cat, then
// index_copy_), with a plain row copy where the dtypes agree (a bf16 block at batch 1: 18.5 -> 14.9 µs a call).
static void store_rows(torch::Tensor pool, const torch::Tensor& write, const torch::Tensor& latent,
                       const torch::Tensor& k_rope) {
  const int64_t C = latent.size(-1), R = k_rope.size(-1), rows = write.numel(), P = pool.size(0);
  if (latent.scalar_type() != pool.scalar_type() || k_rope.scalar_type() != pool.scalar_type() ||
      write.scalar_type() != torch::kLong || !pool.is_contiguous() || latent.numel() != rows * C ||
      k_rope.numel() != rows * R || pool.size(1) != C + R) {
    pool.index_copy_(0, write, torch::cat({latent, k_rope}, -1).reshape({-1, pool.size(1)}).to(pool.scalar_type()));
    return;
  }
  const auto w = write.contiguous(), lat = latent.contiguous(), kr = k_rope.contiguous();
  const int64_t* at = w.data_ptr<int64_t>();
  const int64_t es = pool.element_size(), width = pool.size(1) * es;
  const auto *lat_p = static_cast<const char*>(lat.data_ptr()), *kr_p = static_cast<const char*>(kr.data_ptr());
  auto* pool_p = static_cast<char*>(pool.data_ptr());
  for (int64_t r = 0; r < rows; ++r) TORCH_CHECK(at[r] >= 0 && at[r] < P, "mla_attend: a write row outside the pool");
  for (int64_t r = 0; r < rows; ++r) {
    std::memcpy(pool_p + at[r] * width, lat_p + r * C * es, C * es);
    std::memcpy(pool_p + at[r] * width + C * es, kr_p + r * R * es, R * es);
  }
}

// FusedMLA.attend over the paged cache: this step's latent (B, S, C) and k_rope (B, S, R) into rows `write` (B*S,)
// of `pool` (P, C + R), then the absorbed attention over pool rows `read` (B, L), then o_proj (an empty weight: the
// caller's, -> (B, S, H*V)) -> (B, S, D).
torch::Tensor mla_attend(torch::Tensor q_nope, torch::Tensor q_rope, torch::Tensor latent, torch::Tensor k_rope,
                         torch::Tensor pool, torch::Tensor write, torch::Tensor read, torch::Tensor mask,
                         torch::Tensor w_uk, torch::Tensor w_uv_t, double scale, std::vector<torch::Tensor> o_proj) {
  const int64_t C = latent.size(-1);
  TORCH_CHECK(pool.dim() == 2 && pool.size(1) == C + k_rope.size(-1), "mla_attend: pool rows must be C + R wide");
  store_rows(pool, write, latent, k_rope);
  const auto out = absorbed_attention(q_nope, q_rope, pool.narrow(1, 0, C), pool.narrow(1, C, pool.size(1) - C),
                                      mask, w_uk, w_uv_t, scale, read);  // (B, S, H*V)
  return o_proj.empty() ? out : linear(out, o_proj);
}

// FusedMLP: x (..., D) -> down(SwiGLU(gate_up(x))), both weights as `linear` takes them.
torch::Tensor mlp(torch::Tensor x, std::vector<torch::Tensor> gate_up, std::vector<torch::Tensor> down) {
  return linear(swiglu(linear(x, gate_up)), down);
}

// ---- a whole ScMoE layer at decode, one call instead of ~25 (FusedScMoELayer, fused.py). The layer's weights and
// numbers by name, as FusedScMoELayer.weight_inputs names them (a single tensor is a list of one; a linear weight
// is its list as `linear` takes it), are made into a plan once (layer_plan) and kept by the layer; each call passes
// only the plan and what changes with the step. (Converting the ~60 weight tensors from Python on every call cost
// ~0.4 ms of a batch-1 int4 token.)
using Tensors = std::map<std::string, std::vector<torch::Tensor>>;
using Numbers = std::map<std::string, double>;
struct LayerPlan {
  Tensors t;
  Numbers f;
};

// The step's tensors: RoPE cos/sin (B * S, R/2), the cache's mask (B, S, L), write (B*S,) and read (B, L) rows,
// and the attention blocks' pools (P, C + R): a layer's two, the MTP head's one.
struct Step {
  torch::Tensor cos, sin, mask, write, read;
  std::vector<torch::Tensor> pools;
};

// A plan a Python object holds: freed with it.
pybind11::capsule layer_plan(Tensors t, Numbers f) {
  return pybind11::capsule(new LayerPlan{std::move(t), std::move(f)}, "longcat.LayerPlan",
                           [](void* plan) { delete static_cast<LayerPlan*>(plan); });
}

static const torch::Tensor& one(const Tensors& t, const std::string& name) {
  const auto& v = t.at(name);
  TORCH_CHECK(v.size() == 1, "decode plan: ", name, " must be one tensor");
  return v[0];
}

static const LayerPlan& plan_of(const pybind11::capsule& plan) {
  TORCH_CHECK(plan.name() != nullptr && std::strcmp(plan.name(), "longcat.LayerPlan") == 0,
              "a decode block's plan must come from layer_plan");
  return *plan.get_pointer<LayerPlan>();
}

// The model's Router (model/moe.py) as the same ATen ops in the same order, so the same experts and gate weights:
// x (T, D) -> probs (T, E+Z), ids (T, K), weights (T, K). The logits through the GEMV kernel, whose sums for a row
// do not depend on the other rows (a GEMM's do): a decode step and a speculative verify route a token alike, as
// FusedMoE.begin does.
static std::vector<torch::Tensor> route(const torch::Tensor& x, const Tensors& t, const Numbers& f) {
  const auto& bias = t.at("router_bias");
  // (a named vector: with a braced {tensor}, argument-dependent lookup would pick at::linear, a GEMM)
  auto logits = linear(x.to(torch::kFloat).contiguous(), std::vector<torch::Tensor>{one(t, "router")});
  if (!bias.empty()) logits = logits + bias[0];
  const auto probs = logits.softmax(-1);
  const auto ids = std::get<1>(at::topk(probs + one(t, "correction"), static_cast<int64_t>(f.at("top_k")), -1,
                                        true, false));
  auto weights = probs.gather(1, ids);
  if (f.at("renormalize") != 0.0) weights = weights / (weights.sum(-1, true) + 1e-20);
  return {probs, ids, weights * f.at("router_scale")};
}

// Attention block i (0 or 1) of the layer: rms_norm'd x through mla_project and mla_attend -> (B, S, D).
static torch::Tensor attention(const torch::Tensor& x, int i, const Tensors& t, const Numbers& f, const Step& s) {
  const std::string a = "attn" + std::to_string(i) + ".";
  const auto h = rms_norm(x, one(t, "input_norm" + std::to_string(i)), f.at("input_eps" + std::to_string(i)));
  const auto p = mla_project(h, t.at(a + "qkv_a"), one(t, a + "q_norm"), f.at(a + "q_eps"), t.at(a + "q_b"),
                             one(t, a + "kv_norm"), f.at(a + "kv_eps"), s.cos, s.sin,
                             static_cast<int64_t>(f.at("heads")));
  return mla_attend(p[0], p[1], p[2], p[3], s.pools.at(i), s.write, s.read, s.mask, one(t, a + "w_uk"),
                    one(t, a + "w_uv_t"), f.at(a + "scale"), t.at(a + "o_proj"));
}

// ScMoELayer.forward (model/block.py): x (B, S, D) -> out (B, S, D), the router's probs (T, E+Z) and ids (T, K);
// the step's tensors as Step names them.
std::vector<torch::Tensor> decode_layer(torch::Tensor x, pybind11::capsule plan, torch::Tensor cos, torch::Tensor sin,
                                        torch::Tensor mask, torch::Tensor write, torch::Tensor read,
                                        torch::Tensor pool0, torch::Tensor pool1) {
  const auto& [t, f] = plan_of(plan);
  const Step step{cos, sin, mask, write, read, {pool0, pool1}};
  const auto x1 = x + attention(x, 0, t, f, step);
  const auto s = rms_norm(x1, one(t, "post_norm0"), f.at("post_eps0"));  // the shortcut: MoE and FFN_0 share it
  const auto s_TD = s.view({-1, s.size(-1)});
  const auto routed = route(s_TD, t, f);
  const auto moe = moe_experts(s_TD, routed[1], routed[2], static_cast<int64_t>(f.at("n_ffn")),
                               f.at("identity") != 0.0, t.at("experts.gate_up"), t.at("experts.down"),
                               static_cast<int64_t>(f.at("expert_rows")));
  TORCH_CHECK(moe.defined(), "decode_layer: more rows per hit expert than the experts kernel takes");
  const auto x2 = x1 + mlp(s, t.at("mlp0.gate_up"), t.at("mlp0.down"));
  const auto x3 = x2 + attention(x2, 1, t, f, step);
  const auto h = rms_norm(x3, one(t, "post_norm1"), f.at("post_eps1"));
  return {x3 + mlp(h, t.at("mlp1.gate_up"), t.at("mlp1.down")) + moe.view_as(x), routed[0], routed[1]};
}

// MTPHead.forward (model/mtp.py) at decode: ids (B, S) of x_{t+1} and the trunk's normed h_t (B, S, D) -> (B, S, D)
// normed, what the lm_head reads. Its plan names the embedding, "enorm", "hnorm", "eh_proj", "norm" and, as a
// layer's first attention block and first MLP, "input_norm0", "attn0.*", "post_norm0", "mlp0.*"; `pool` is its
// block's.
torch::Tensor mtp_head(torch::Tensor ids, torch::Tensor hidden, pybind11::capsule plan, torch::Tensor cos,
                       torch::Tensor sin, torch::Tensor mask, torch::Tensor write, torch::Tensor read,
                       torch::Tensor pool) {
  const auto& [t, f] = plan_of(plan);
  const Step step{cos, sin, mask, write, read, {pool}};
  const auto e = rms_norm(at::embedding(one(t, "embed"), ids), one(t, "enorm"), f.at("enorm_eps"));
  const auto z = linear(at::cat({e, rms_norm(hidden, one(t, "hnorm"), f.at("hnorm_eps"))}, -1), t.at("eh_proj"));
  const auto z1 = z + attention(z, 0, t, f, step);
  const auto h = rms_norm(z1, one(t, "post_norm0"), f.at("post_eps0"));
  return rms_norm(z1 + mlp(h, t.at("mlp0.gate_up"), t.at("mlp0.down")), one(t, "norm"), f.at("norm_eps"));
}
