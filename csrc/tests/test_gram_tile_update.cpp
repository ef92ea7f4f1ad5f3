// C++ test of the CPU kernel of tangent_kernels::gram_tile_update, reached the way
// every caller reaches it: through the dispatcher, by name. Built and run by CMake
// (ctest); the Python tests in tests/test_gram_tile_update.py cover the full grid.

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <iostream>
#include <string>

namespace {

using OpSignature = void(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t, bool);

c10::TypedOperatorHandle<OpSignature> op() {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow("tangent_kernels::gram_tile_update", "")
      .typed<OpSignature>();
}

int failures = 0;

void expect(bool ok, const std::string& what) {
  std::cout << (ok ? "ok    " : "FAIL  ") << what << "\n";
  if (!ok) ++failures;
}

// Runs the op on K (a view), compares with a float64 reference of the same update.
void check_case(const std::string& name, at::Tensor K, const at::Tensor& A, const at::Tensor& B, int64_t row_offset,
                int64_t col_offset, bool lower) {
  const at::Tensor before = K.clone();
  op().call(K, A, B, row_offset, col_offset, lower);

  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  const at::Tensor rows = at::arange(A.size(0), f64).add(static_cast<double>(row_offset)).unsqueeze(1);
  const at::Tensor cols = at::arange(B.size(0), f64).add(static_cast<double>(col_offset)).unsqueeze(0);
  const at::Tensor allowed = lower ? rows.ge(cols) : at::ones({A.size(0), B.size(0)}, f64.dtype(at::kBool));
  const at::Tensor product = at::mm(A.to(at::kDouble), B.to(at::kDouble).t());
  const at::Tensor expected = at::where(allowed, before.to(at::kDouble) + product, before.to(at::kDouble));

  // Worst-case rounding bound of a length-d dot product accumulated in K's dtype, plus
  // the final addition: (d + 2) * u * (|A| |B|^T + |K|).
  const double u = K.scalar_type() == at::kDouble ? std::ldexp(1.0, -53) : std::ldexp(1.0, -24);
  const at::Tensor scale = at::mm(A.to(at::kDouble).abs(), B.to(at::kDouble).abs().t()) + before.to(at::kDouble).abs();
  const at::Tensor err = (K.to(at::kDouble) - expected).abs();
  const bool close = err.le(scale * ((A.size(1) + 2) * u) + 1e-300).all().item<bool>();
  const bool untouched = at::equal(K.masked_select(allowed.logical_not()), before.masked_select(allowed.logical_not()));
  expect(close && untouched, name + (close ? "" : " [values off]") + (untouched ? "" : " [masked entries changed]"));
}

}  // namespace

int main() {
  at::manual_seed(0);
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  const auto f64 = at::TensorOptions().dtype(at::kDouble);

  check_case("1x1x1 fp32", at::randn({1, 1}, f32), at::randn({1, 1}, f32), at::randn({1, 1}, f32), 0, 0, false);
  check_case("5x123 d=77 fp32", at::randn({5, 123}, f32), at::randn({5, 77}, f32), at::randn({123, 77}, f32), 0, 0,
             false);
  check_case("300x290 d=50 lower diagonal fp32", at::randn({300, 290}, f32), at::randn({300, 50}, f32),
             at::randn({290, 50}, f32), 0, 0, true);
  check_case("300x290 d=50 lower crossing fp64", at::randn({300, 290}, f64), at::randn({300, 50}, f64),
             at::randn({290, 50}, f64), 7, 40, true);
  check_case("9x10 d=8269 fp16 (chunked upcast) lower", at::randn({9, 10}, f32),
             at::randn({9, 8269}, f32).to(at::kHalf), at::randn({10, 8269}, f32).to(at::kHalf), 3, 0, true);
  check_case("33x17 d=40 bf16 into fp64", at::randn({33, 17}, f64), at::randn({33, 40}, f32).to(at::kBFloat16),
             at::randn({17, 40}, f32).to(at::kBFloat16), 0, 0, false);

  // In place on strided views of a bigger matrix; nothing outside the view may change.
  at::Tensor full = at::randn({40, 50}, f32);
  const at::Tensor full_before = full.clone();
  at::Tensor view = full.narrow(0, 3, 20).narrow(1, 5, 30);
  check_case("strided view 20x30 lower", view, at::randn({20, 11}, f32), at::randn({30, 11}, f32), 10, 0, true);
  at::Tensor outside = at::ones({40, 50}, f32.dtype(at::kBool));
  outside.narrow(0, 3, 20).narrow(1, 5, 30).fill_(false);
  expect(at::equal(full.masked_select(outside), full_before.masked_select(outside)), "entries outside the view");
  at::Tensor transposed = at::randn({30, 20}, f32).t();
  check_case("transposed view 20x30", transposed, at::randn({20, 6}, f32), at::randn({30, 6}, f32), 0, 0, false);

  check_case("0 rows", at::empty({0, 4}, f32), at::empty({0, 3}, f32), at::randn({4, 3}, f32), 0, 0, true);

  bool threw = false;
  try {
    at::Tensor K = at::zeros({2, 2}, f32);
    op().call(K, at::randn({2, 3}, f32), at::randn({2, 3}, f64), 0, 0, false);
  } catch (const c10::Error& e) {
    threw = std::string(e.what()).find("same dtype") != std::string::npos;
  }
  expect(threw, "dtype mismatch raises a clear error");

  std::cout << (failures == 0 ? "all passed" : std::to_string(failures) + " failed") << "\n";
  return failures == 0 ? 0 : 1;
}
