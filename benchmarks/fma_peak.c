/* Peak fp32 FMA throughput of this CPU: independent FMA chains on every OpenMP thread, with AVX2 (8 lanes)
 * and, where the CPU has it, AVX-512 (16 lanes). Used by benchmarks/ffn_ceiling.py as the hardware bound
 * on any GEMM. Prints the best GFLOP/s summed over threads, then "avx2 X avx512 Y" on a second line.
 * Build: cc -O2 -mavx2 -mfma -fopenmp fma_peak.c -o fma_peak
 * (AVX2's 16 registers hold 12 chains, enough for two FMA pipes of latency 4 or 5, not more; AVX-512's
 * 32 registers hold 24. An AVX2-only measurement undercounts a CPU that has AVX-512.) */
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>

#define CHAINS2 12
#define CHAINS5 24

static double avx2_peak(long iters) {
    double total = 0.0;
#pragma omp parallel reduction(+ : total)
    {
        __m256 acc[CHAINS2];
        for (int i = 0; i < CHAINS2; i++) acc[i] = _mm256_set1_ps(1.0f + (float)i * 1e-7f);
        const __m256 mul = _mm256_set1_ps(0.9999999f), add = _mm256_set1_ps(1e-7f);
#pragma omp barrier
        double t0 = omp_get_wtime();
        for (long n = 0; n < iters; n++) {
#pragma GCC unroll 12
            for (int i = 0; i < CHAINS2; i++) acc[i] = _mm256_fmadd_ps(acc[i], mul, add);
        }
        double dt = omp_get_wtime() - t0;
        float sink = 0.0f, lanes[8];
        for (int i = 0; i < CHAINS2; i++) {
            _mm256_storeu_ps(lanes, acc[i]);
            sink += lanes[0];
        }
        if (sink == 42.0f) printf("(unlikely)\n"); /* keeps the chains live */
        total += (double)iters * CHAINS2 * 16.0 / dt / 1e9; /* 8 lanes x (mul + add) per FMA */
    }
    return total;
}

__attribute__((target("avx512f"))) static double avx512_peak(long iters) {
    double total = 0.0;
#pragma omp parallel reduction(+ : total)
    {
        __m512 acc[CHAINS5];
        for (int i = 0; i < CHAINS5; i++) acc[i] = _mm512_set1_ps(1.0f + (float)i * 1e-7f);
        const __m512 mul = _mm512_set1_ps(0.9999999f), add = _mm512_set1_ps(1e-7f);
#pragma omp barrier
        double t0 = omp_get_wtime();
        for (long n = 0; n < iters; n++) {
#pragma GCC unroll 24
            for (int i = 0; i < CHAINS5; i++) acc[i] = _mm512_fmadd_ps(acc[i], mul, add);
        }
        double dt = omp_get_wtime() - t0;
        float sink = 0.0f, lanes[16];
        for (int i = 0; i < CHAINS5; i++) {
            _mm512_storeu_ps(lanes, acc[i]);
            sink += lanes[0];
        }
        if (sink == 42.0f) printf("(unlikely)\n");
        total += (double)iters * CHAINS5 * 32.0 / dt / 1e9; /* 16 lanes x (mul + add) per FMA */
    }
    return total;
}

int main(void) {
    double a2 = avx2_peak(50000000L), a5 = 0.0;
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) a5 = avx512_peak(25000000L);
    printf("%.2f\n", a5 > a2 ? a5 : a2);
    printf("avx2 %.2f avx512 %.2f\n", a2, a5);
    return 0;
}
