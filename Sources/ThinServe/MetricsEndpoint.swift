import NIOCore
import NIOHTTP1
import NIOPosix
import class Prometheus.PrometheusCollectorRegistry

/// `--metrics HOST:PORT`: a small HTTP/1.1 server answering `GET /metrics` with the
/// Prometheus text format (and 404 for anything else). The pool's gauges are sampled
/// at each scrape.
final class MetricsEndpoint: @unchecked Sendable {
    private let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
    private let channel: Channel
    let host: String
    let port: Int

    init(host: String, port: Int, registry: PrometheusCollectorRegistry, beforeScrape: @escaping @Sendable () -> Void) throws {
        let group = self.group
        do {
            channel = try ServerBootstrap(group: group)
                .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
                .childChannelInitializer { channel in
                    channel.pipeline.configureHTTPServerPipeline().flatMapThrowing {
                        try channel.pipeline.syncOperations.addHandler(MetricsHTTPHandler(registry: registry, beforeScrape: beforeScrape))
                    }
                }
                .bind(host: host, port: port)
                .wait()
        } catch {
            try? group.syncShutdownGracefully()
            throw ServeError(description: "--metrics \(host):\(port): \(error)")
        }
        self.host = host
        self.port = channel.localAddress?.port ?? port
    }

    /// Where the metrics are, as a URL.
    var url: String { "http://\(host.contains(":") ? "[\(host)]" : host):\(port)/metrics" }

    func stop() {
        try? channel.close().wait()
        try? group.syncShutdownGracefully()
    }
}

final class MetricsHTTPHandler: ChannelInboundHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    private let registry: PrometheusCollectorRegistry
    private let beforeScrape: @Sendable () -> Void
    private var head: HTTPRequestHead?

    init(registry: PrometheusCollectorRegistry, beforeScrape: @escaping @Sendable () -> Void) {
        self.registry = registry
        self.beforeScrape = beforeScrape
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let request):
            head = request
        case .body:
            break
        case .end:
            guard let request = head else { return }
            head = nil
            let found = request.method == .GET && (request.uri == "/metrics" || request.uri.hasPrefix("/metrics?"))
            var body = context.channel.allocator.buffer(capacity: 4096)
            if found {
                beforeScrape()
                body.writeBytes(registry.emitToBuffer())
            } else {
                body.writeString("thinbd serves its metrics at /metrics\n")
            }
            var headers = HTTPHeaders()
            headers.add(name: "Content-Type", value: found ? "text/plain; version=0.0.4; charset=utf-8" : "text/plain")
            headers.add(name: "Content-Length", value: String(body.readableBytes))
            let keepAlive = request.isKeepAlive
            if !keepAlive { headers.add(name: "Connection", value: "close") }
            let response = HTTPResponseHead(version: request.version, status: found ? .ok : .notFound, headers: headers)
            context.write(wrapOutboundOut(.head(response)), promise: nil)
            context.write(wrapOutboundOut(.body(.byteBuffer(body))), promise: nil)
            let done = context.writeAndFlush(wrapOutboundOut(.end(nil)))
            if !keepAlive {
                let channel = context.channel
                done.whenComplete { _ in channel.close(promise: nil) }
            }
        }
    }
}
