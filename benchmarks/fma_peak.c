/* Peak fp32 FMA throughput of this CPU with AVX2: independent FMA chains on every OpenMP thread.
 * Used by benchmarks/ffn_ceiling.py as the hardware bound on any GEMM. Prints GFLOP/s summed over
 * threads. Build: cc -O2 -mavx2 -mfma -fopenmp fma_peak.c -o fma_peak */
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>

#define CHAINS 10 /* enough independent chains to cover FMA latency x units */

int main(void) {
    const long iters = 100000000L;
    double total = 0.0;
#pragma omp parallel reduction(+ : total)
    {
        __m256 acc[CHAINS];
        for (int i = 0; i < CHAINS; i++) acc[i] = _mm256_set1_ps(1.0f + (float)i * 1e-7f);
        const __m256 mul = _mm256_set1_ps(0.9999999f), add = _mm256_set1_ps(1e-7f);
#pragma omp barrier
        double t0 = omp_get_wtime();
        for (long n = 0; n < iters; n++) {
#pragma GCC unroll 10
            for (int i = 0; i < CHAINS; i++) acc[i] = _mm256_fmadd_ps(acc[i], mul, add);
        }
        double dt = omp_get_wtime() - t0;
        float sink = 0.0f, lanes[8];
        for (int i = 0; i < CHAINS; i++) {
            _mm256_storeu_ps(lanes, acc[i]);
            sink += lanes[0];
        }
        if (sink == 42.0f) printf("(unlikely)\n"); /* keeps the chains live */
        total += (double)iters * CHAINS * 16.0 / dt / 1e9; /* 8 lanes x (mul + add) per FMA */
    }
    printf("%.2f\n", total);
    return 0;
}
