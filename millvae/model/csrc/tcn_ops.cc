// The elementwise work of a keras-tcn residual block with SELU activations, fused into a few
// passes over memory: built and loaded by millvae/native.py, used by millvae.model.FusedTCN.
//
// A block computes conv0 -> +bias -> selu -> conv1 -> +bias -> selu -> selu (the skip output)
// -> + residual -> selu (the next block's input). TensorFlow runs each arrow as its own op, and
// its gradient as another, each a full pass over a [windows, steps, filters] tensor; on two CPU
// cores those passes cost as much as the convolutions. Here: one pass for bias + selu (+ selu),
// one for residual + selu, and one each for their gradients (with the bias gradient). Outputs
// that feed a causal convolution are written after its zero padding, so no Pad op (and no Slice
// in the gradient) is needed. Same arithmetic as TensorFlow's BiasAdd, Selu and SeluGrad kernels.
#include <algorithm>
#include <cstring>
#include <functional>
#include <mutex>
#include <vector>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/util/work_sharder.h"

using namespace tensorflow;  // NOLINT

namespace {
constexpr float kScale = 1.0507009873554804934193349852946f;
constexpr float kScaleAlpha = 1.7580993408473768599402175208123f;

using Arr = Eigen::Map<Eigen::ArrayXf>;
using CArr = Eigen::Map<const Eigen::ArrayXf>;

inline void Selu(const float* in, float* out, int64_t n) {
  CArr z(in, n);
  Arr y(out, n);
  y = (z < 0.f).select(kScaleAlpha * (z.exp() - 1.f), kScale * z);
}

// TensorFlow's SeluGrad: the derivative from the activation's output.
inline void SeluGrad(const float* g, const float* y, float* out, int64_t n) {
  CArr gg(g, n), yy(y, n);
  Arr o(out, n);
  o = (yy < 0.f).select(gg * (yy + kScaleAlpha), gg * kScale);
}

inline void AddRows(const float* __restrict a, const float* __restrict b, float* __restrict out,
                    int64_t rows, int64_t c) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* ar = a + r * c;
    float* o = out + r * c;
    for (int64_t k = 0; k < c; ++k) o[k] = ar[k] + b[k];
  }
}

// out = (res + bias) + a, row by row (bias may be null): Keras' add([BiasAdd(conv), a]).
inline void AddResidual(const float* __restrict a, const float* __restrict res,
                        const float* __restrict bias, float* __restrict out, int64_t rows,
                        int64_t c) {
  if (bias == nullptr) {
    for (int64_t k = 0; k < rows * c; ++k) out[k] = res[k] + a[k];
    return;
  }
  for (int64_t r = 0; r < rows; ++r) {
    const float* ar = a + r * c;
    const float* rr = res + r * c;
    float* o = out + r * c;
    for (int64_t k = 0; k < c; ++k) o[k] = (rr[k] + bias[k]) + ar[k];
  }
}

// Column sums of rows x c, added into acc (double).
inline void ColumnSums(const float* __restrict d, int64_t rows, int64_t c, float* __restrict tmp,
                       double* __restrict acc) {
  std::fill(tmp, tmp + c, 0.f);
  for (int64_t r = 0; r < rows; ++r) {
    const float* dr = d + r * c;
    for (int64_t k = 0; k < c; ++k) tmp[k] += dr[k];
  }
  for (int64_t k = 0; k < c; ++k) acc[k] += tmp[k];
}

void ForWindows(OpKernelContext* ctx, int64_t windows, int64_t cost,
                const std::function<void(int64_t, int64_t)>& fn) {
  auto* pool = ctx->device()->tensorflow_cpu_worker_threads();
  Shard(pool->num_threads, pool->workers, windows, cost, fn);
}

absl::Status Rank3(shape_inference::InferenceContext* c, int i,
                   shape_inference::ShapeHandle* out) {
  return c->WithRank(c->input(i), 3, out);
}

// [n, t + pad, c] from [n, t, c]
absl::Status Padded(shape_inference::InferenceContext* c, shape_inference::ShapeHandle in,
                    int64_t pad, shape_inference::ShapeHandle* out) {
  shape_inference::DimensionHandle t;
  if (pad >= 0) {
    TF_RETURN_IF_ERROR(c->Add(c->Dim(in, 1), pad, &t));
  } else {
    TF_RETURN_IF_ERROR(c->Subtract(c->Dim(in, 1), -pad, &t));
  }
  return c->ReplaceDim(in, 1, t, out);
}
}  // namespace

// y = selu(x + bias) (twice: selu(selu(x + bias)), mid = the inner one), written after `pad`
// zero steps of each window: [n, t + pad, c].
REGISTER_OP("MillvaeBiasSelu")
    .Input("x: float")
    .Input("bias: float")
    .Attr("twice: bool = false")
    .Attr("pad: int >= 0 = 0")
    .Output("y: float")
    .Output("mid: float")
    .SetShapeFn([](shape_inference::InferenceContext* c) {
      bool twice;
      int64_t pad;
      TF_RETURN_IF_ERROR(c->GetAttr("twice", &twice));
      TF_RETURN_IF_ERROR(c->GetAttr("pad", &pad));
      shape_inference::ShapeHandle x, y;
      TF_RETURN_IF_ERROR(Rank3(c, 0, &x));
      TF_RETURN_IF_ERROR(Padded(c, x, pad, &y));
      c->set_output(0, y);
      c->set_output(1, twice ? x : c->Vector(0));
      return absl::OkStatus();
    });

REGISTER_OP("MillvaeBiasSeluGrad")
    .Input("dy: float")
    .Input("y: float")
    .Input("mid: float")
    .Attr("twice: bool = false")
    .Attr("pad: int >= 0 = 0")
    .Output("dx: float")
    .Output("dbias: float")
    .SetShapeFn([](shape_inference::InferenceContext* c) {
      int64_t pad;
      TF_RETURN_IF_ERROR(c->GetAttr("pad", &pad));
      shape_inference::ShapeHandle dy, dx;
      TF_RETURN_IF_ERROR(Rank3(c, 0, &dy));
      TF_RETURN_IF_ERROR(Padded(c, dy, -pad, &dx));
      c->set_output(0, dx);
      c->set_output(1, c->Vector(c->Dim(dy, 2)));
      return absl::OkStatus();
    });

// y = selu(a + res[:, offset:] (+ bias)), written after `pad` zero steps: [n, t + pad, c].
REGISTER_OP("MillvaeAddSelu")
    .Input("a: float")
    .Input("res: float")
    .Input("bias: float")
    .Attr("offset: int >= 0 = 0")
    .Attr("pad: int >= 0 = 0")
    .Output("y: float")
    .SetShapeFn([](shape_inference::InferenceContext* c) {
      int64_t pad;
      TF_RETURN_IF_ERROR(c->GetAttr("pad", &pad));
      shape_inference::ShapeHandle a, y;
      TF_RETURN_IF_ERROR(Rank3(c, 0, &a));
      TF_RETURN_IF_ERROR(Padded(c, a, pad, &y));
      c->set_output(0, y);
      return absl::OkStatus();
    });

// da = selu'(y) dy on the unpadded steps; dres: da after `offset` zero steps (only if offset > 0,
// else empty: da serves both); dbias: column sums of da if there is a bias, else empty.
REGISTER_OP("MillvaeAddSeluGrad")
    .Input("dy: float")
    .Input("y: float")
    .Attr("offset: int >= 0 = 0")
    .Attr("pad: int >= 0 = 0")
    .Attr("with_bias: bool = false")
    .Output("da: float")
    .Output("dres: float")
    .Output("dbias: float")
    .SetShapeFn([](shape_inference::InferenceContext* c) {
      int64_t pad, offset;
      bool with_bias;
      TF_RETURN_IF_ERROR(c->GetAttr("pad", &pad));
      TF_RETURN_IF_ERROR(c->GetAttr("offset", &offset));
      TF_RETURN_IF_ERROR(c->GetAttr("with_bias", &with_bias));
      shape_inference::ShapeHandle dy, da, dres;
      TF_RETURN_IF_ERROR(Rank3(c, 0, &dy));
      TF_RETURN_IF_ERROR(Padded(c, dy, -pad, &da));
      TF_RETURN_IF_ERROR(Padded(c, da, offset, &dres));
      c->set_output(0, da);
      c->set_output(1, offset > 0 ? dres : c->Vector(0));
      c->set_output(2, with_bias ? c->Vector(c->Dim(dy, 2)) : c->Vector(0));
      return absl::OkStatus();
    });

class BiasSeluOp : public OpKernel {
 public:
  explicit BiasSeluOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("twice", &twice_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("pad", &pad_));
  }
  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    const Tensor& bias = ctx->input(1);
    OP_REQUIRES(ctx, x.dims() == 3 && bias.dims() == 1 && x.dim_size(2) == bias.dim_size(0),
                errors::InvalidArgument("MillvaeBiasSelu: expected x [n, t, c] and bias [c]; got ",
                                        x.shape().DebugString(), " and ",
                                        bias.shape().DebugString()));
    const int64_t n = x.dim_size(0), t = x.dim_size(1), c = x.dim_size(2), p = pad_;
    Tensor *y = nullptr, *mid = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({n, t + p, c}), &y));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, twice_ ? x.shape() : TensorShape({0}), &mid));
    if (n == 0 || c == 0) return;
    const float* xp = x.flat<float>().data();
    const float* bp = bias.flat<float>().data();
    float* yp = y->flat<float>().data();
    float* mp = twice_ ? mid->flat<float>().data() : nullptr;
    const bool twice = twice_;
    ForWindows(ctx, n, t * c * (twice ? 40 : 20), [&](int64_t w0, int64_t w1) {
      for (int64_t w = w0; w < w1; ++w) {
        float* out = yp + w * (t + p) * c;
        std::fill(out, out + p * c, 0.f);
        out += p * c;
        float* stage = twice ? mp + w * t * c : out;
        AddRows(xp + w * t * c, bp, stage, t, c);
        Selu(stage, stage, t * c);
        if (twice) Selu(stage, out, t * c);
      }
    });
  }

 private:
  bool twice_;
  int64_t pad_;
};

class BiasSeluGradOp : public OpKernel {
 public:
  explicit BiasSeluGradOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("twice", &twice_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("pad", &pad_));
  }
  void Compute(OpKernelContext* ctx) override {
    const Tensor& dy = ctx->input(0);
    const Tensor& y = ctx->input(1);
    const Tensor& mid = ctx->input(2);
    OP_REQUIRES(ctx, dy.dims() == 3 && dy.shape() == y.shape() && dy.dim_size(1) >= pad_,
                errors::InvalidArgument("MillvaeBiasSeluGrad: dy and y differ in shape"));
    const int64_t n = dy.dim_size(0), t = dy.dim_size(1) - pad_, c = dy.dim_size(2), p = pad_;
    OP_REQUIRES(ctx, !twice_ || mid.shape() == TensorShape({n, t, c}),
                errors::InvalidArgument("MillvaeBiasSeluGrad: mid has the wrong shape"));
    Tensor *dx = nullptr, *db = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({n, t, c}), &dx));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({c}), &db));
    float* dbp = db->flat<float>().data();
    std::fill(dbp, dbp + c, 0.f);
    if (n == 0 || c == 0) return;
    const float* g = dy.flat<float>().data();
    const float* yp = y.flat<float>().data();
    const float* mp = twice_ ? mid.flat<float>().data() : nullptr;
    float* o = dx->flat<float>().data();
    const bool twice = twice_;
    std::mutex mu;
    std::vector<double> total(c, 0.0);
    ForWindows(ctx, n, t * c * (twice ? 12 : 8), [&](int64_t w0, int64_t w1) {
      std::vector<double> acc(c, 0.0);
      std::vector<float> tmp(c);
      for (int64_t w = w0; w < w1; ++w) {
        const int64_t in = w * (t + p) * c + p * c, out = w * t * c;
        SeluGrad(g + in, yp + in, o + out, t * c);
        if (twice) SeluGrad(o + out, mp + out, o + out, t * c);
        ColumnSums(o + out, t, c, tmp.data(), acc.data());
      }
      std::lock_guard<std::mutex> lock(mu);
      for (int64_t k = 0; k < c; ++k) total[k] += acc[k];
    });
    for (int64_t k = 0; k < c; ++k) dbp[k] = static_cast<float>(total[k]);
  }

 private:
  bool twice_;
  int64_t pad_;
};

class AddSeluOp : public OpKernel {
 public:
  explicit AddSeluOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("offset", &offset_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("pad", &pad_));
  }
  void Compute(OpKernelContext* ctx) override {
    const Tensor& a = ctx->input(0);
    const Tensor& res = ctx->input(1);
    const Tensor& bias = ctx->input(2);
    OP_REQUIRES(ctx, a.dims() == 3, errors::InvalidArgument("MillvaeAddSelu: a must be 3-D"));
    const int64_t n = a.dim_size(0), t = a.dim_size(1), c = a.dim_size(2), p = pad_,
                  off = offset_;
    OP_REQUIRES(ctx, res.shape() == TensorShape({n, t + off, c}),
                errors::InvalidArgument("MillvaeAddSelu: res must be [n, t + offset, c]; got ",
                                        res.shape().DebugString()));
    const bool with_bias = bias.NumElements() > 0;
    OP_REQUIRES(ctx, !with_bias || bias.shape() == TensorShape({c}),
                errors::InvalidArgument("MillvaeAddSelu: bias must be [c] or empty"));
    Tensor* y = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({n, t + p, c}), &y));
    if (n == 0 || c == 0) return;
    const float* ap = a.flat<float>().data();
    const float* rp = res.flat<float>().data();
    const float* bp = with_bias ? bias.flat<float>().data() : nullptr;
    float* yp = y->flat<float>().data();
    ForWindows(ctx, n, t * c * 24, [&](int64_t w0, int64_t w1) {
      for (int64_t w = w0; w < w1; ++w) {
        float* out = yp + w * (t + p) * c;
        std::fill(out, out + p * c, 0.f);
        out += p * c;
        AddResidual(ap + w * t * c, rp + w * (t + off) * c + off * c, bp, out, t, c);
        Selu(out, out, t * c);
      }
    });
  }

 private:
  int64_t offset_, pad_;
};

class AddSeluGradOp : public OpKernel {
 public:
  explicit AddSeluGradOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("offset", &offset_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("pad", &pad_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("with_bias", &with_bias_));
  }
  void Compute(OpKernelContext* ctx) override {
    const Tensor& dy = ctx->input(0);
    const Tensor& y = ctx->input(1);
    OP_REQUIRES(ctx, dy.dims() == 3 && dy.shape() == y.shape() && dy.dim_size(1) >= pad_,
                errors::InvalidArgument("MillvaeAddSeluGrad: dy and y differ in shape"));
    const int64_t n = dy.dim_size(0), t = dy.dim_size(1) - pad_, c = dy.dim_size(2), p = pad_,
                  off = offset_;
    Tensor *da = nullptr, *dres = nullptr, *db = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({n, t, c}), &da));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(
                            1, off > 0 ? TensorShape({n, t + off, c}) : TensorShape({0}), &dres));
    OP_REQUIRES_OK(ctx,
                   ctx->allocate_output(2, with_bias_ ? TensorShape({c}) : TensorShape({0}), &db));
    if (with_bias_) {
      float* dbp = db->flat<float>().data();
      std::fill(dbp, dbp + c, 0.f);
    }
    if (n == 0 || c == 0) return;
    const float* g = dy.flat<float>().data();
    const float* yp = y.flat<float>().data();
    float* o = da->flat<float>().data();
    float* r = off > 0 ? dres->flat<float>().data() : nullptr;
    const bool with_bias = with_bias_;
    std::mutex mu;
    std::vector<double> total(c, 0.0);
    ForWindows(ctx, n, t * c * 10, [&](int64_t w0, int64_t w1) {
      std::vector<double> acc(c, 0.0);
      std::vector<float> tmp(c);
      for (int64_t w = w0; w < w1; ++w) {
        const int64_t in = w * (t + p) * c + p * c, out = w * t * c;
        SeluGrad(g + in, yp + in, o + out, t * c);
        if (r != nullptr) {
          float* rw = r + w * (t + off) * c;
          std::fill(rw, rw + off * c, 0.f);
          std::memcpy(rw + off * c, o + out, sizeof(float) * t * c);
        }
        if (with_bias) ColumnSums(o + out, t, c, tmp.data(), acc.data());
      }
      if (with_bias) {
        std::lock_guard<std::mutex> lock(mu);
        for (int64_t k = 0; k < c; ++k) total[k] += acc[k];
      }
    });
    if (with_bias) {
      float* dbp = db->flat<float>().data();
      for (int64_t k = 0; k < c; ++k) dbp[k] = static_cast<float>(total[k]);
    }
  }

 private:
  int64_t offset_, pad_;
  bool with_bias_;
};

REGISTER_KERNEL_BUILDER(Name("MillvaeBiasSelu").Device(DEVICE_CPU), BiasSeluOp);
REGISTER_KERNEL_BUILDER(Name("MillvaeBiasSeluGrad").Device(DEVICE_CPU), BiasSeluGradOp);
REGISTER_KERNEL_BUILDER(Name("MillvaeAddSelu").Device(DEVICE_CPU), AddSeluOp);
REGISTER_KERNEL_BUILDER(Name("MillvaeAddSeluGrad").Device(DEVICE_CPU), AddSeluGradOp);
