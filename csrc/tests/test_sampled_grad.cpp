// C++ test of the CPU kernel of tangent_kernels::sampled_conv_grad, reached through
// the dispatcher by name like every caller. Built and run by CMake (ctest); the
// Python tests in tests/test_sampled_ops.py cover every op, dtype and shape family.

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <iostream>
#include <optional>
#include <string>

namespace {

using ConvSignature = void(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, c10::ArrayRef<int64_t>, c10::ArrayRef<int64_t>, const at::Tensor&,
                           const std::optional<at::Tensor>&);

int failures = 0;

void expect(bool ok, const std::string& what) {
  std::cout << (ok ? "ok    " : "FAIL  ") << what << "\n";
  if (!ok) ++failures;
}

}  // namespace

int main() {
  const auto conv = c10::Dispatcher::singleton()
                        .findSchemaOrThrow("tangent_kernels::sampled_conv_grad", "")
                        .typed<ConvSignature>();
  at::manual_seed(0);
  // A 2-D conv: stride (2, 1), dilation (1, 2), kernel (3, 2), input 9x8 -> output 4x6.
  const int64_t batch = 3, channels = 4, out_channels = 5, m = 7;
  const int64_t stride[] = {2, 1}, dilation[] = {1, 2};
  const at::Tensor a = at::randn({batch, channels, 9, 8}, at::kDouble);
  const at::Tensor d = at::randn({batch, out_channels, 4, 6}, at::kDouble);
  const at::Tensor oc = at::randint(0, out_channels, {m}, at::kLong);
  const at::Tensor ic = at::randint(0, channels, {m}, at::kLong);
  const at::Tensor offsets = at::stack({at::randint(0, 3, {m}, at::kLong), at::randint(0, 2, {m}, at::kLong)}, 1);
  const at::Tensor out = at::zeros({batch, m + 2}, at::kDouble);
  const at::Tensor columns = at::arange(m, at::kLong).add(2);  // leaves columns 0 and 1 alone
  conv.call(a, d, oc, ic, offsets, stride, dilation, out, columns);

  double worst = 0.0;
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t j = 0; j < m; ++j) {
      const int64_t o = oc[j].item<int64_t>(), c = ic[j].item<int64_t>();
      const int64_t k0 = offsets[j][0].item<int64_t>(), k1 = offsets[j][1].item<int64_t>();
      double sum = 0.0;
      for (int64_t p0 = 0; p0 < 4; ++p0) {
        for (int64_t p1 = 0; p1 < 6; ++p1) {
          sum += d[b][o][p0][p1].item<double>() *
                 a[b][c][p0 * stride[0] + k0 * dilation[0]][p1 * stride[1] + k1 * dilation[1]].item<double>();
        }
      }
      worst = std::max(worst, std::abs(out[b][j + 2].item<double>() - sum));
    }
  }
  // float64 sums of 24 terms of size ~1: rounding ~1e-15.
  expect(worst < 1e-12, "sampled_conv_grad matches a direct loop (max error " + std::to_string(worst) + ")");
  expect(out.narrow(1, 0, 2).eq(0).all().item<bool>(), "columns outside out_columns are left untouched");

  bool raised = false;
  try {
    conv.call(a, d, oc, ic, offsets.add(5), stride, dilation, out, columns);
  } catch (const c10::Error& error) {
    raised = std::string(error.what()).find("reads outside a_pad") != std::string::npos;
  }
  expect(raised, "an out-of-range kernel offset is refused with a message");
  return failures == 0 ? 0 : 1;
}
