// swift-tools-version:6.1
import PackageDescription

import class Foundation.ProcessInfo

// Layering (see docs/architecture.md):
//   CLibAIO, CThinSupport (with liburing) -> ThinSystem (the only module that touches C and syscalls)
//   ThinFormat (pure codecs) -> ThinMetadata (cache, transactions, space maps, B-trees)
//   -> ThinPool (volumes, allocator, volume I/O) -> ThinControl (control protocol, commands)
//   -> ThinServe (NBD exports, control socket) -> ThinCLI -> thinbd
//   NBDProtocol (codecs, handshake state machines) and NBDTLS (credentials, swift-nio-ssl)
//   -> NBDServer, NBDClient
// The modules every NBD request runs through, in release builds only: no run-time
// exclusivity checks. Most of them are swift-nio's ByteBuffer code inlined here, about
// 1,000 instructions a request (docs/performance.md). Debug builds, which run the tests,
// keep the checks, so an overlapping access still fails there. Neither module is part of
// the ThinPool library product, which stays free of unsafe flags for packages that
// depend on it.
let requestPathSettings: [SwiftSetting] = [.unsafeFlags(["-enforce-exclusivity=unchecked"], .when(configuration: .release))]

let package = Package(
    name: "thinbd",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "thinbd", targets: ["thinbd"]),
        .library(name: "ThinPool", targets: ["ThinPool"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-nio", from: "2.101.2"),
        .package(url: "https://github.com/apple/swift-atomics", from: "1.3.0"),
        .package(url: "https://github.com/apple/swift-nio-ssl", from: "2.37.6"),
        .package(url: "https://github.com/apple/swift-asn1", from: "1.7.4"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-metrics", from: "2.13.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus", from: "2.4.1"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle", from: "2.13.0"),
    ],
    targets: [
        .systemLibrary(
            name: "CLibAIO",
            path: "Sources/CLibAIO",
            providers: [.apt(["libaio-dev"])]
        ),
        // support.c wraps liburing (liburing-dev): its header defines _GNU_SOURCE, which
        // no header Swift sees may do.
        .target(name: "CThinSupport", linkerSettings: [.linkedLibrary("uring")]),
        .target(name: "ThinSystem", dependencies: ["CLibAIO", "CThinSupport"]),
        .target(name: "ThinFormat"),
        .target(name: "ThinMetadata", dependencies: ["ThinFormat", "ThinSystem"]),
        .target(name: "ThinPool", dependencies: ["ThinMetadata", "ThinFormat", "ThinSystem"]),
        .target(name: "ThinControl", dependencies: ["ThinPool", "ThinFormat", "ThinSystem"]),
        .target(
            name: "NBDProtocol", dependencies: [.product(name: "NIOCore", package: "swift-nio")],
            swiftSettings: requestPathSettings),
        .target(
            name: "NBDTLS",
            dependencies: [
                "ThinSystem",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOTLS", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "SwiftASN1", package: "swift-asn1"),
            ]
        ),
        .target(
            name: "NBDServer",
            dependencies: [
                "NBDProtocol", "NBDTLS",
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "NIOTLS", package: "swift-nio"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "Atomics", package: "swift-atomics"),
                "ThinSystem",
            ],
            swiftSettings: requestPathSettings
        ),
        .target(
            name: "NBDClient",
            dependencies: [
                "NBDProtocol", "NBDTLS", "ThinSystem",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "NIOTLS", package: "swift-nio"),
            ]
        ),
        .target(
            name: "ThinTransfer",
            dependencies: ["ThinPool", "ThinFormat", "ThinSystem", "ThinControl", "NBDClient", "NBDProtocol", "NBDTLS"]
        ),
        .target(
            name: "ThinServe",
            dependencies: [
                "ThinPool", "ThinSystem", "ThinControl", "NBDServer", "NBDProtocol", "NBDTLS",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "Prometheus", package: "swift-prometheus"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ]
        ),
        .target(
            name: "ThinCLI",
            dependencies: [
                "ThinPool", "ThinFormat", "ThinSystem", "ThinControl", "ThinServe", "ThinTransfer", "NBDProtocol", "NBDTLS",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .executableTarget(name: "thinbd", dependencies: ["ThinCLI"]),
        .executableTarget(
            name: "nbd-fuzz",
            dependencies: ["NBDProtocol", "NBDServer", .product(name: "NIOCore", package: "swift-nio")],
            path: "tools/nbd-fuzz"
        ),
        .testTarget(name: "ThinFormatTests", dependencies: ["ThinFormat"]),
        .testTarget(name: "ThinSystemTests", dependencies: ["ThinSystem", "CThinSupport"]),
        .testTarget(name: "ThinMetadataTests", dependencies: ["ThinMetadata", "ThinFormat", "ThinSystem"]),
        .testTarget(name: "ThinPoolTests", dependencies: ["ThinPool", "ThinSystem", "TestSupport"]),
        .target(name: "TestSupport", path: "Tests/TestSupport"),
        .testTarget(name: "ThinControlTests", dependencies: ["ThinControl", "ThinPool", "ThinSystem", "TestSupport"]),
        .testTarget(name: "ThinTransferTests", dependencies: ["ThinTransfer", "ThinPool", "ThinSystem"]),
        .testTarget(name: "ThinCLITests", dependencies: ["ThinCLI", "ThinControl", "ThinServe", "ThinSystem", "TestSupport"]),
        .testTarget(
            name: "NBDProtocolTests",
            dependencies: [
                "NBDProtocol", "NBDServer", "ThinSystem", .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOEmbedded", package: "swift-nio"), .product(name: "NIOPosix", package: "swift-nio"),
            ]
        ),
        .testTarget(
            name: "NBDTLSTests", dependencies: ["NBDTLS", .product(name: "NIOSSL", package: "swift-nio-ssl")]),
        .testTarget(name: "InteropTests", dependencies: ["ThinFormat", "ThinPool", "ThinSystem", "TestSupport"], exclude: ["scripts"]),
    ],
    swiftLanguageModes: [.v6]
)

// Engine benchmarks (Benchmarks/) use ordo-one/benchmark. They are added only when asked
// for, so the regular build and CI do not compile the framework:
//   THINBD_BENCHMARKS=1 swift package benchmark      (or tools/bench-engine.sh)
if ProcessInfo.processInfo.environment["THINBD_BENCHMARKS"] != nil {
    package.dependencies.append(
        .package(url: "https://github.com/ordo-one/benchmark", from: "1.38.1", traits: ["MallocInterposer"]))
    package.targets.append(
        .executableTarget(
            name: "EngineBenchmarks",
            dependencies: [
                "ThinPool", "ThinSystem",
                .product(name: "Benchmark", package: "benchmark"),
            ],
            path: "Benchmarks/EngineBenchmarks",
            plugins: [.plugin(name: "BenchmarkPlugin", package: "benchmark")]
        ))
}

// The coverage-guided fuzzer (tools/fuzz, libFuzzer): only when asked for, with
// `-sanitize=fuzzer` from the command line, so the regular build never compiles it:
//   THINBD_FUZZ=1 swift build -c release --product thinbd-fuzz -Xswiftc -sanitize=fuzzer
//   (or tools/fuzz-libfuzzer.sh)
if ProcessInfo.processInfo.environment["THINBD_FUZZ"] != nil {
    package.targets.append(
        .executableTarget(
            name: "thinbd-fuzz",
            dependencies: ["ThinFormat", "NBDProtocol", "NBDServer", "ThinControl", .product(name: "NIOCore", package: "swift-nio")],
            path: "tools/fuzz",
            // libFuzzer brings main(); the entry point is LLVMFuzzerTestOneInput.
            swiftSettings: [.unsafeFlags(["-parse-as-library"])]
        ))
}
